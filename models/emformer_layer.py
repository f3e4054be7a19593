"""One Emformer layer (Shi et al. 2021) with torchaudio ``_EmformerLayer`` math, two faces.

Per segment of ``S`` frames with ``R`` hard-copied right-context frames:

1. pre-LN on ``[rc; utt]`` (``layer_norm_input``);
2. attention, queries ``[rc; utt; summary]``, keys/values ``[memory; rc; left context; utt]``,
   where ``summary`` is the mean of the layer-normed segment and the summary row never attends
   memory (paper: keeps distant context from being over-weighted);
3. residual on the *un-normalised* ``[rc; utt]``;
4. ``pos_ff`` = LayerNorm, Linear(D, ffn), activation, Linear(ffn, D), with a residual;
5. ``layer_norm_output``.

The summary row's attention output, clamped to [-10, 10] (or tanh'd), is this segment's memory
entry for the *next* layer. Layer ``l``'s memory bank holds the ``M`` most recent entries it
received from layer ``l-1`` (layer 0 receives the mean of the raw input segment).

Faces:
- :meth:`EmformerLayer.forward` — all segments at once with a block mask
  (:func:`segment_attention_mask`), as training and the offline reference run it;
- :meth:`EmformerLayer.step` — one segment with an explicit fixed-shape cache (DESIGN §4): memory
  ``[B, M, D]``, projected left-context keys/values ``[B, L, D]``, validity from the int32
  per-stream segment counter only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .attention import MultiheadAttention, fifo_append, right_aligned_valid

MEMORY_CLAMP = 10.0  # torchaudio clamps new memory to [-10, 10] unless tanh_on_mem

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation expected one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def _cat(parts: list[Tensor | None], dim: int = 1) -> Tensor:
    """Concatenate the present parts (``None`` = a block switched off by the config)."""
    return torch.cat([p for p in parts if p is not None], dim=dim)


def _all_valid(like: Tensor, width: int) -> Tensor:
    """``[B, width]`` all-True, batch taken from ``like`` ``[B, ...]`` (no data-dependent size)."""
    return torch.ones(1, width, dtype=torch.bool, device=like.device).expand(like.shape[0], width)


def num_segments(num_frames: int, segment_length: int) -> int:
    """Segments covering ``num_frames`` utterance frames (the last one may be partial)."""
    return math.ceil(num_frames / segment_length)


def segment_means(x: Tensor, segment_length: int) -> Tensor:
    """Mean of every segment, the last one over its frames only (torchaudio's AvgPool1d with
    ``ceil_mode=True``).

    Args:
        x: ``[B, T, D]``.
    Returns:
        ``[B, ceil(T / S), D]``.
    """
    B, T, D = x.shape
    S = segment_length
    N = num_segments(T, S)
    padded = nn.functional.pad(x, (0, 0, 0, N * S - T))
    sums = padded.reshape(B, N, S, D).sum(dim=2)
    counts = torch.tensor([min(S, T - i * S) for i in range(N)], dtype=x.dtype, device=x.device)
    return sums / counts.view(1, N, 1)


def segment_attention_mask(num_frames: int, segment_length: int, right_context: int,
                           left_context: int, memory_size: int,
                           device: torch.device | None = None) -> Tensor:
    """Block mask of the full-utterance pass (torchaudio ``_gen_attention_mask``, True = allowed).

    With ``N = ceil(T/S)`` segments:
    rows ``[rc blocks (N*R); utterance (T); summaries (N, only if M > 0)]``,
    columns ``[memory (N-1, only if M > 0); rc blocks (N*R); utterance (T)]``.
    Rows of segment ``i`` may attend memory slots ``[i-M, i)``, their own rc block and utterance
    frames ``[i*S - L, (i+1)*S)``; summary rows the same minus memory.

    Returns:
        bool ``[Q, K]``.
    """
    S, R, L, M = segment_length, right_context, left_context, memory_size
    T = num_frames
    N = num_segments(T, S)

    def arange(n: int) -> Tensor:  # Range is fine here: this mask is for training, never exported
        return torch.arange(n, device=device)

    rows = [arange(N * R) // R if R else arange(0), arange(T) // S]  # segment of each row
    if M > 0:
        rows.append(arange(N))
    row_seg = torch.cat(rows).unsqueeze(1)  # [Q, 1]
    is_summary = torch.cat([torch.zeros(N * R + T, dtype=torch.bool, device=device),
                            torch.ones(N if M > 0 else 0, dtype=torch.bool, device=device)])
    blocks = []
    if M > 0:
        mem = arange(N - 1).unsqueeze(0)
        blocks.append((mem < row_seg) & (mem >= row_seg - M) & ~is_summary.unsqueeze(1))
    if R > 0:
        blocks.append((arange(N * R) // R).unsqueeze(0) == row_seg)
    utt = arange(T).unsqueeze(0)
    blocks.append((utt >= row_seg * S - L) & (utt < (row_seg + 1) * S))
    return torch.cat(blocks, dim=1)


class EmformerLayer(nn.Module):
    """Emformer layer: ``d_model`` D, ``num_heads`` H, segment S, left context L, memory M.

    The right-context length is not a layer parameter: it is whatever ``right_context`` holds.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, segment_length: int,
                 left_context: int = 0, memory_size: int = 0, activation: str = "relu",
                 tanh_on_mem: bool = False, dropout: float = 0.0,
                 weight_init_gain: float | None = None):
        super().__init__()
        self.d_model, self.segment_length = d_model, segment_length
        self.left_context, self.memory_size = left_context, memory_size
        self.tanh_on_mem = tanh_on_mem
        self.attention = MultiheadAttention(d_model, num_heads)
        self.layer_norm_input = nn.LayerNorm(d_model)
        self.pos_ff = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, ffn_dim),
            _activation(activation),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, d_model),
            nn.Dropout(dropout),
        )
        self.dropout = nn.Dropout(dropout)
        self.layer_norm_output = nn.LayerNorm(d_model)
        if weight_init_gain:  # torchaudio's depth-scaled Xavier init of the q/k/v projections
            for proj in (self.attention.q_proj, self.attention.k_proj, self.attention.v_proj):
                nn.init.xavier_uniform_(proj.weight, gain=weight_init_gain)

    @property
    def use_memory(self) -> bool:
        return self.memory_size > 0

    # ---- pieces shared by both faces ----------------------------------------------------------

    def _pre_norm(self, right_context: Tensor | None, utterance: Tensor) -> tuple[Tensor | None, Tensor]:
        """LayerNorm of ``[rc; utt]`` -> (normed rc ``[B, R', D]`` or None, normed utt ``[B, T, D]``)."""
        if right_context is None:
            return None, self.layer_norm_input(utterance)
        R = right_context.shape[1]
        normed = self.layer_norm_input(torch.cat([right_context, utterance], dim=1))
        return normed[:, :R], normed[:, R:]

    def _post_attention(self, attended: Tensor, right_context: Tensor | None,
                        utterance: Tensor) -> tuple[Tensor, Tensor | None]:
        """Residual on the raw inputs, FFN with residual, output LN.

        Args:
            attended: ``[B, R' + T, D]`` attention output of the rc and utterance rows.
        Returns:
            (utterance out ``[B, T, D]``, rc out ``[B, R', D]`` or None).
        """
        x = self.dropout(attended) + _cat([right_context, utterance])
        x = self.layer_norm_output(self.pos_ff(x) + x)
        if right_context is None:
            return x, None
        R = right_context.shape[1]
        return x[:, R:], x[:, :R]

    def _memory_output(self, summary_out: Tensor) -> Tensor:
        """Bound the summary rows' attention output: it becomes the next layer's memory."""
        if self.tanh_on_mem:
            return torch.tanh(summary_out)
        return summary_out.clamp(-MEMORY_CLAMP, MEMORY_CLAMP)

    # ---- full utterance (training / offline reference) ----------------------------------------

    def forward(self, utterance: Tensor, right_context: Tensor | None, memory: Tensor | None,
                allowed: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """All segments at once.

        Args:
            utterance: ``[B, T, D]`` layer input frames.
            right_context: ``[B, N*R, D]`` hard-copied rc blocks, segment-major; None when R = 0.
            memory: ``[B, N-1, D]`` memory entries from the layer below (entry ``j`` = segment
                ``j``); None when M = 0.
            allowed: bool ``[B or 1, Q, K]`` from :func:`segment_attention_mask` (& key padding).
        Returns:
            (utterance out ``[B, T, D]``, rc out ``[B, N*R, D]`` or None,
            memory for the next layer ``[B, N-1, D]`` or None).
        """
        ln_rc, ln_utt = self._pre_norm(right_context, utterance)
        summary = segment_means(ln_utt, self.segment_length) if self.use_memory else None
        keys, values = self.attention.project_kv(_cat([memory, ln_rc, ln_utt]))
        out = self.attention.attend(_cat([ln_rc, ln_utt, summary]), keys, values, allowed)
        rows = utterance.shape[1] + (0 if right_context is None else right_context.shape[1])
        utt_out, rc_out = self._post_attention(out[:, :rows], right_context, utterance)
        # The last segment's memory entry has no later segment to serve.
        next_memory = self._memory_output(out[:, rows:-1]) if self.use_memory else None
        return utt_out, rc_out, next_memory

    # ---- one segment with an explicit cache (streaming / export) ------------------------------

    def _step_allowed(self, processed_segments: Tensor, right_context: int) -> Tensor | None:
        """Attention mask of one step from the per-stream counter only.

        Key columns are ``[memory (M); rc (R); left context (L); utt (S)]``: memory slot validity
        ``= min(n, M)`` right-aligned, left-context ``= min(n*S, L)``; rc/utt always valid, so no
        row is ever fully masked. The summary row (last) additionally never sees memory.

        Args:
            processed_segments: ``[B]`` int32 segments this stream has already seen.
        Returns:
            bool ``[B, R + S (+1 summary), K]``, or None when nothing is ever masked (M = L = 0).
        """
        M, L, S, R = self.memory_size, self.left_context, self.segment_length, right_context
        if M == 0 and L == 0:
            return None
        n = processed_segments
        rc = _all_valid(n, R) if R else None
        lc = right_aligned_valid(n * S, L) if L else None
        mem = right_aligned_valid(n, M) if M else None
        valid = _cat([mem, rc, lc, _all_valid(n, S)])  # [B, K]
        allowed = valid.unsqueeze(1).expand(-1, R + S, -1)
        if not self.use_memory:
            return allowed
        summary_row = _cat([torch.zeros_like(mem), rc, lc, _all_valid(n, S)]).unsqueeze(1)
        return torch.cat([allowed, summary_row], dim=1)

    def step(self, utterance: Tensor, right_context: Tensor | None, new_memory: Tensor | None,
             cache: dict[str, Tensor], processed_segments: Tensor,
             ) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor]]:
        """One segment.

        Args:
            utterance: ``[B, S, D]``; right_context: ``[B, R, D]`` or None when R = 0.
            new_memory: ``[B, 1, D]`` this segment's entry from the layer below (stored after
                use, so it serves the *next* segment); None when M = 0.
            cache: ``memory`` ``[B, M, D]`` (if M > 0), ``left_keys`` / ``left_values``
                ``[B, L, D]`` (if L > 0): this layer's slice of the stage state.
            processed_segments: ``[B]`` int32 per-stream counter (before this segment).
        Returns:
            (utterance out ``[B, S, D]``, rc out ``[B, R, D]`` or None,
            memory entry for the next layer ``[B, 1, D]`` or None, next cache (same keys/shapes)).
        """
        M, L, S = self.memory_size, self.left_context, self.segment_length
        R = 0 if right_context is None else right_context.shape[1]
        ln_rc, ln_utt = self._pre_norm(right_context, utterance)
        summary = ln_utt.mean(dim=1, keepdim=True) if self.use_memory else None
        # Memory and the new frames are projected; cached left-context K/V are reused as is.
        k, v = self.attention.project_kv(_cat([cache.get("memory"), ln_rc, ln_utt]))
        k_utt, v_utt = k[:, M + R:], v[:, M + R:]
        # [memory; rc] keys stay in front (torchaudio's order); never slice a zero-length block.
        k_head, v_head = (k[:, :M + R], v[:, :M + R]) if M + R else (None, None)
        keys = _cat([k_head, cache.get("left_keys"), k_utt])
        values = _cat([v_head, cache.get("left_values"), v_utt])
        allowed = self._step_allowed(processed_segments, R)
        out = self.attention.attend(_cat([ln_rc, ln_utt, summary]), keys, values, allowed)
        utt_out, rc_out = self._post_attention(out[:, :R + S], right_context, utterance)

        next_cache: dict[str, Tensor] = {}
        next_memory = None
        if M:
            next_memory = self._memory_output(out[:, R + S:])
            next_cache["memory"] = fifo_append(cache["memory"], new_memory)
        if L:
            next_cache["left_keys"] = fifo_append(cache["left_keys"], k_utt)
            next_cache["left_values"] = fifo_append(cache["left_values"], v_utt)
        return utt_out, rc_out, next_memory, next_cache
