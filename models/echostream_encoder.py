"""EchoStream's streaming encoder: Conv2D 4x subsampling + a stack of Emformer layers.

No positional encoding (as torchaudio's Emformer: attention is segment-local plus left context and
memory, so order comes from the block structure).

Two faces that agree to fp32 rounding (``parity_tests/test_emformer.py``):

- :meth:`EchoStreamEncoder.forward` — full utterance, StreamSpeech's encoder-output contract. The
  last ``R`` subsampled frames are only the final segment's right context, so ``T = T_sub - R``
  output frames (torchaudio ``Emformer.forward`` semantics).
- :meth:`EchoStreamEncoder.step` — one fbank window ``[B, 4(S+R)+3, 80]`` starting 3 frames
  before the segment (zeros before the utterance; advanced by ``4S`` per call) -> ``S`` frames,
  with the stage state of ``echostream.contract.encoder_contract``:
  ``memory`` ``[B, NL, M, D]``, ``left_keys`` / ``left_values`` ``[B, NL, L, D]``,
  ``processed_segments`` ``[B]`` int32 (one counter per stream, so streams at different positions
  batch correctly). Written for ``torch.onnx.export`` (dynamo, opset 18, batch the only dynamic
  axis): per-layer caches are stacked at the end, FIFOs are concat + constant slice, masks come
  from the counter compared with constant index vectors.
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from echostream.config import EchoStreamConfig, EncoderConfig
from echostream.contract import (StageContract, emformer_states, encoder_window_frames,
                                 state_contract)

from .emformer_layer import EmformerLayer, num_segments, segment_attention_mask, segment_means
from .state import check_state, zero_state
from .subsampling import Conv2dSubsampling, subsampled_length

COUNTER = "processed_segments"
CACHE_NAMES = ("memory", "left_keys", "left_values")  # per-layer caches, stacked on axis 1


def encoder_state_contract(cfg: EncoderConfig) -> StageContract:
    """The encoder stage's state specs for ``cfg``."""
    return state_contract("encoder", emformer_states(cfg.num_layers, cfg.d_model, cfg.memory_size,
                                                     cfg.left_context))


class EchoStreamEncoder(nn.Module):
    """Conv2dSubsampling(input_dim -> d_model) + ``num_layers`` :class:`EmformerLayer`."""

    def __init__(self, cfg: EncoderConfig, dropout: float = 0.0):
        super().__init__()
        if cfg.kind != "emformer" or cfg.subsampling != "conv2d":
            raise ValueError(
                "EchoStreamEncoder expects kind='emformer', subsampling='conv2d'; "
                f"got kind={cfg.kind!r}, subsampling={cfg.subsampling!r}"
            )
        self.cfg = cfg
        self.contract = encoder_state_contract(cfg)
        self.subsampling = Conv2dSubsampling(cfg.input_dim, cfg.subsampling_channels, cfg.d_model)
        self.layers = nn.ModuleList(
            EmformerLayer(
                cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.segment_length,
                left_context=cfg.left_context, memory_size=cfg.memory_size,
                activation=cfg.activation, tanh_on_mem=cfg.tanh_on_mem, dropout=dropout,
                weight_init_gain=(i + 1) ** -0.5,  # torchaudio's "depthwise" strategy
            )
            for i in range(cfg.num_layers)
        )

    @property
    def window_frames(self) -> int:
        """Fbank frames per :meth:`step`: ``4(S+R)+3``."""
        return encoder_window_frames(EchoStreamConfig(encoder=self.cfg))

    @property
    def hop_frames(self) -> int:
        """Fbank frames the step window advances: ``4S``."""
        return 4 * self.cfg.segment_length

    def initial_state(self, batch: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """Zero caches, counters 0 (a fresh stream)."""
        return zero_state(self.contract, batch, device)

    # ---- full utterance ------------------------------------------------------------------------

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> dict[str, list[Tensor]]:
        """Full-utterance pass.

        Args:
            features: ``[B, F, input_dim]`` fbank frames.
            lengths: ``[B]`` integer valid fbank frames per utterance (None = all ``F``).
        Returns:
            ``{"encoder_out": [[T, B, D]], "encoder_padding_mask": [[B, T] bool, True = pad],
            "encoder_lengths": [[B] int64]}`` with ``T = subsampled_length(F) - R``.
        """
        B, F = features.shape[0], features.shape[1]
        if lengths is None:
            lengths = torch.full((B,), F, dtype=torch.long, device=features.device)
        if lengths.shape != (B,) or lengths.dtype.is_floating_point:
            raise ValueError(f"lengths expected an integer tensor of shape [{B}], "
                             f"got {lengths.dtype} {list(lengths.shape)}")
        frames = self.subsampling(features)  # [B, T_sub, D]
        R = self.cfg.right_context
        T = frames.shape[1] - R
        if T < 1:
            raise ValueError(f"features need at least {4 * R + 1} frames for one output "
                             f"frame plus {R} right-context frames, got {F}")
        out_lengths = (subsampled_length(lengths.long()) - R).clamp(0, T)
        out = self.forward_frames(frames, out_lengths)
        padding_mask = torch.arange(T, device=out.device).unsqueeze(0) >= out_lengths.unsqueeze(1)
        return {
            "encoder_out": [out.transpose(0, 1)],
            "encoder_padding_mask": [padding_mask],
            "encoder_lengths": [out_lengths],
        }

    def _right_context_blocks(self, frames: Tensor, T: int) -> Tensor | None:
        """Hard copy of each segment's R look-ahead frames.

        Args:
            frames: ``[B, T + R, D]``.
        Returns:
            ``[B, N*R, D]``: segment ``i < N-1`` gets frames ``[(i+1)S, (i+1)S+R)``, the last one
            the final R frames; None when R = 0.
        """
        S, R = self.cfg.segment_length, self.cfg.right_context
        if R == 0:
            return None
        N = num_segments(T, S)
        starts = [(i + 1) * S for i in range(N - 1)] + [T]
        index = torch.tensor([s + r for s in starts for r in range(R)], device=frames.device)
        return frames.index_select(1, index)

    def forward_frames(self, frames: Tensor, lengths: Tensor) -> Tensor:
        """The Emformer stack over subsampled frames (torchaudio ``Emformer.forward``).

        Args:
            frames: ``[B, T + R, D]`` utterance frames followed by the final right context.
            lengths: ``[B]`` valid utterance frames (``<= T``); later utterance frames are keys
                no one attends.
        Returns:
            ``[B, T, D]``.
        """
        cfg = self.cfg
        S, R, M = cfg.segment_length, cfg.right_context, cfg.memory_size
        T = frames.shape[1] - R
        utterance = frames[:, :T]
        right_context = self._right_context_blocks(frames, T)
        memory = segment_means(utterance, S)[:, :-1] if M > 0 else None
        allowed = segment_attention_mask(T, S, R, cfg.left_context, M, frames.device)
        # Key padding: only utterance columns (the last T) can be padding.
        fixed_cols = allowed.shape[1] - T
        utt_valid = torch.arange(T, device=frames.device).unsqueeze(0) < lengths.unsqueeze(1)
        key_valid = torch.cat([utt_valid.new_ones(lengths.shape[0], fixed_cols), utt_valid], dim=1)
        allowed = allowed.unsqueeze(0) & key_valid.unsqueeze(1)  # [B, Q, K]
        for layer in self.layers:
            utterance, right_context, memory = layer(utterance, right_context, memory, allowed)
        return utterance

    # ---- one segment ---------------------------------------------------------------------------

    def step(self, x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One streaming step.

        Args:
            x: ``[B, 4(S+R)+3, input_dim]`` fbank frames ``4Sk-3 .. 4Sk+4(S+R)-1`` of step ``k``
                (zeros before the utterance; advance the window by ``4S`` per call).
            state: contract state (see module docstring); :meth:`initial_state` for a new stream.
        Returns:
            (``y`` ``[B, S, D]``, next state with the same keys, shapes and dtypes).
        """
        W, C = self.window_frames, self.cfg.input_dim
        if x.dim() != 3 or x.shape[1] != W or x.shape[2] != C:
            raise ValueError(f"encoder step: x expected [B, {W}, {C}], got {list(x.shape)}")
        check_state(self.contract, state, x.shape[0])
        frames = self.subsampling.window(x, state[COUNTER] == 0)
        return self.step_frames(frames, state)

    def step_frames(self, frames: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The Emformer stack on one segment of subsampled frames (torchaudio ``Emformer.infer``,
        but with a per-stream counter).

        Args:
            frames: ``[B, S + R, D]`` segment followed by its right context.
            state: contract state (validated by :meth:`step`).
        Returns:
            (``[B, S, D]``, next state).
        """
        S, R, M = self.cfg.segment_length, self.cfg.right_context, self.cfg.memory_size
        counter = state[COUNTER]
        utterance = frames[:, :S]
        right_context = frames[:, S:] if R else None
        # Layer 0's memory entry for this segment: the mean of the raw input segment.
        new_memory = utterance.mean(dim=1, keepdim=True) if M else None
        names = [n for n in CACHE_NAMES if n in state]
        per_layer = {n: state[n].unbind(dim=1) for n in names}  # NL x [B, slots, D]
        next_caches: dict[str, list[Tensor]] = {n: [] for n in names}
        for i, layer in enumerate(self.layers):
            cache = {n: per_layer[n][i] for n in names}
            utterance, right_context, new_memory, cache = layer.step(
                utterance, right_context, new_memory, cache, counter)
            for n in names:
                next_caches[n].append(cache[n])
        next_state = {n: torch.stack(next_caches[n], dim=1) for n in names}
        next_state[COUNTER] = counter + 1
        return utterance, next_state
