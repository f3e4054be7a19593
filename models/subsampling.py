"""Conv2D front end: two 3x3 stride-2 convolutions, 10 ms fbank frames -> 40 ms encoder frames.

StreamSpeech's ``Conv2dSubsampler`` (``chunk_unity/modules/convolution.py:103-150``, the fairseq /
ESPnet one): ``Conv2d(1, C, 3, stride 2, padding 1) + ReLU``, ``Conv2d(C, C, 3, stride 2,
padding 1) + ReLU``, then ``Linear(C * F', D)`` with ``F' = 20`` mel bins left of 80. Parameter
names (``conv.0``, ``conv.2``, ``out``) are fairseq's.

Symbols: ``B`` batch, ``F`` fbank frames, ``N`` encoder frames, ``C`` channels, ``D`` width.

Window arithmetic (DESIGN §5). With padding 1, first-conv frame ``v`` reads fbank frames
``2v-1 .. 2v+1`` and encoder frame ``u`` reads first-conv frames ``2u-1 .. 2u+1``, i.e. fbank
frames ``4u-3 .. 4u+3``. So a window of ``4N + 3`` fbank frames starting 3 frames before encoder
frame ``s`` (``4s - 3``), convolved *without* time padding, yields encoder frames ``s .. s+N-1``
equal to the full pass, with one exception at the utterance start: the window's first first-conv
row is frame ``2s - 1``, which for ``s = 0`` is the second conv's zero padding, not a computed
frame; :meth:`Conv2dSubsampling.window` zeroes it there (and the caller fills fbank frames before
the utterance with zeros). Frequency keeps padding 1 in both faces. No subsampling state is needed:
the window advances by ``4S``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WINDOW_LEAD = 3  # fbank frames a window starts before its first encoder frame


def subsampled_length(num_frames: int | Tensor) -> int | Tensor:
    """Encoder frames of the full pass over ``num_frames`` fbank frames: ``(F - 1) // 4 + 1``.

    Args:
        num_frames: a Python int, or an integer tensor of any shape (e.g. ``lengths`` ``[B]``).
    Returns:
        the same kind of value; 0 for 0 frames.
    """
    out = (num_frames - 1) // 2 // 2 + 1
    if isinstance(out, Tensor):
        return torch.where(num_frames > 0, out, torch.zeros_like(out))
    return out if num_frames > 0 else 0


def window_frames(num_encoder_frames: int) -> int:
    """Fbank frames a window needs for ``num_encoder_frames`` encoder frames: ``4N + 3``."""
    return 4 * num_encoder_frames + WINDOW_LEAD


def step_window(features: Tensor, step: int, hop: int, width: int, lead: int = WINDOW_LEAD) -> Tensor:
    """Streaming step ``step``'s fbank window of a whole utterance (for tests and parity).

    Args:
        features: ``[B, F, C]`` the utterance's fbank frames.
        hop: fbank frames per step (``4S``); width: window frames (``4(S+R)+3``);
        lead: frames the window starts before the step (3 here; the chunk Conformer's is 2).
    Returns:
        ``[B, width, C]`` frames ``step * hop - lead ..``, zeros outside the utterance.
    """
    start = step * hop - lead
    lo, hi = max(start, 0), min(start + width, features.shape[1])
    out = features.new_zeros(features.shape[0], width, features.shape[2])
    if hi > lo:
        out[:, lo - start:hi - start] = features[:, lo:hi]
    return out


class Conv2dSubsampling(nn.Module):
    """Conv2d(1, C, 3, s2, p1) + ReLU, Conv2d(C, C, 3, s2, p1) + ReLU, Linear(C * F', D).

    ``forward(features [B, F, input_dim]) -> [B, subsampled_length(F), D]`` (the full pass);
    ``window(x [B, 4N+3, input_dim], first [B] bool) -> [B, N, D]`` (one streaming window).

    Examples:
        >>> sub = Conv2dSubsampling(80, 8, 16)
        >>> full = sub(torch.randn(1, 64, 80))                       # [1, 16, 16]
    """

    def __init__(self, input_dim: int = 80, channels: int = 256, d_model: int = 256):
        super().__init__()
        if input_dim < 2:
            raise ValueError(f"input_dim must be >= 2 for two 3x3 stride-2 convs, got {input_dim}")
        self.input_dim = input_dim
        self.freq_out = ((input_dim - 1) // 2) // 2 + 1
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.out = nn.Linear(channels * self.freq_out, d_model)

    def _check(self, features: Tensor, min_frames: int) -> None:
        if features.dim() != 3 or features.shape[2] != self.input_dim:
            raise ValueError(
                f"features expected [B, F, {self.input_dim}], got {list(features.shape)}"
            )
        if features.shape[1] < min_frames:
            raise ValueError(f"features need at least {min_frames} frames, got {features.shape[1]}")

    def _project(self, x: Tensor) -> Tensor:
        """``[B, C, T, F']`` -> ``[B, T, D]``."""
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))

    def forward(self, features: Tensor) -> Tensor:
        """``[B, F, input_dim]`` fbank -> ``[B, subsampled_length(F), D]`` encoder frames."""
        self._check(features, 1)
        return self._project(self.conv(features.unsqueeze(1)))

    def window(self, x: Tensor, first: Tensor) -> Tensor:
        """One streaming window (see the module doc).

        Args:
            x: ``[B, 4N + 3, input_dim]`` fbank frames ``4s - 3 .. 4s + 4N - 1`` (zeros before the
                utterance).
            first: ``[B]`` bool, True where the window starts the utterance (``s = 0``).
        Returns:
            ``[B, N, D]`` encoder frames ``s .. s + N - 1``.
        """
        self._check(x, window_frames(1))
        conv1, conv2 = self.conv[0], self.conv[2]
        h = F.relu(F.conv2d(x.unsqueeze(1), conv1.weight, conv1.bias, stride=2, padding=(0, 1)))
        # Row 0 is first-conv frame 2s - 1: at s = 0 the second conv's zero padding.
        keep_first_row = (~first).to(h.dtype).view(-1, 1, 1, 1)
        rows = torch.cat([h[:, :, :1] * keep_first_row, h[:, :, 1:]], dim=2)
        h = F.relu(F.conv2d(rows, conv2.weight, conv2.bias, stride=2, padding=(0, 1)))
        return self._project(h)
