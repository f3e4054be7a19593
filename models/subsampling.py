"""Conv2D front end: two 3x3 stride-2 convolutions, 10 ms fbank frames -> 40 ms encoder frames.

No time padding, so encoder frame ``j`` reads exactly fbank frames ``[4j, 4j + 7)``. That makes the
streaming window trivial: ``N`` encoder frames need ``4N + 3`` fbank frames, and a window of
``4(S+R) + 3`` frames advanced by ``4S`` reproduces the full pass exactly, with no subsampling state
(DESIGN §5).
"""
from __future__ import annotations

from torch import Tensor, nn


def subsampled_length(num_frames: int | Tensor) -> int | Tensor:
    """Encoder frames produced from ``num_frames`` fbank frames: ``((F-3)//2 + 1 - 3)//2 + 1``.

    Args:
        num_frames: a Python int, or an integer tensor of any shape (e.g. ``lengths`` ``[B]``).
    Returns:
        the same kind of value; never negative (fewer than 7 fbank frames give 0 encoder frames).
    """
    out = ((num_frames - 3) // 2 + 1 - 3) // 2 + 1
    if isinstance(out, Tensor):
        return out.clamp(min=0)
    return max(out, 0)


def window_frames(num_encoder_frames: int) -> int:
    """Fbank frames needed for ``num_encoder_frames`` encoder frames: ``4N + 3``."""
    return 4 * num_encoder_frames + 3


class Conv2dSubsampling(nn.Module):
    """Conv2d(1, C, 3, s2) + ReLU, Conv2d(C, C, 3, s2) + ReLU, then Linear(C * F', D).

    ``F' = ((input_dim - 1)//2 - 1)//2`` mel bins survive the two convolutions (19 for 80 bins).
    """

    def __init__(self, input_dim: int = 80, channels: int = 256, d_model: int = 256):
        super().__init__()
        self.input_dim = input_dim
        self.freq_out = ((input_dim - 1) // 2 - 1) // 2
        if self.freq_out < 1:
            raise ValueError(f"input_dim must be >= 7 for two 3x3 stride-2 convs, got {input_dim}")
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, stride=2),
            nn.ReLU(),
        )
        self.out = nn.Linear(channels * self.freq_out, d_model)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, F, input_dim]`` fbank -> ``[B, subsampled_length(F), d_model]`` encoder frames."""
        if features.dim() != 3 or features.shape[2] != self.input_dim:
            raise ValueError(
                f"features expected [B, F, {self.input_dim}], got {list(features.shape)}"
            )
        if features.shape[1] < 7:
            raise ValueError(f"features need at least 7 frames (one encoder frame), got {features.shape[1]}")
        x = self.conv(features.unsqueeze(1))  # [B, C, T', F']
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))
