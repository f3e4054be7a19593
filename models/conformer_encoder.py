"""StreamSpeech's chunk-based Conformer encoder (the released model, streamspeech-facts.md §1-§2),
with a streaming ``step`` that carries explicit fixed-shape state.

Symbols: ``B`` batch, ``F`` fbank frames (10 ms), ``T`` encoder frames (40 ms), ``D`` width,
``H`` heads, ``d_k = D / H``, ``NL`` layers, ``C`` the attention chunk in encoder frames
(``cfg.chunk_size``; StreamSpeech's agent uses ``segment_ms // 40``), ``c = conv_chunk(C)`` = 16 if
C >= 16 else 8 (every conv's chunk, counted in that conv's own input frames), ``P = kernel // 2`` a
conv's left context, ``K`` the sentence capacity (``sentence.max_source_frames``), ``R`` attention
chunks per block (``lcm(C, c) / C``: 1 for C = 8, 16, 32; 2 for C = 4, 12, 24), ``W = R C``.

Full pass (:meth:`ChunkConformerEncoder.forward`): fbank ``[B, F, 80]`` -> ``Conv1dSubsampler``
(Conv1d(80, ch, 5, stride 2) + GLU, Conv1d(ch/2, 2D, 5, stride 2) + GLU; 4x) -> x sqrt(D) ->
``Linear(D, D)`` -> ``NL`` x ``ChunkConformerEncoderLayer`` (x + FFN/2, x + rel-pos MHA, x + conv
module, x + FFN/2, LN) -> ``[T, B, D]``, ``T = ((F-1)//2)//2 + 1``. Parameter names are fairseq's
(``subsample.conv_layers.*``, ``linear``, ``conformer_layers.*``); dropout is left out.

**The conv rule (StreamSpeech's ``ChunkCausalConv1d``, ``chunk_unity/modules/chunk_causal_conv1d.py``
with the agent's chunk sizes).** Every subsampler conv and every depthwise conv cuts its own input
into chunks of ``c`` frames; a chunk is convolved with the ``P`` real frames right before it (they
may reach back more than one chunk: P = 15 > c = 8 for kernel 31) and zeros after its end. Output
length ``(L - 1) // stride + 1``. Attention: frame ``i`` sees every frame ``j < (i // C + 1) C``.
(Training draws c from {8, 16} per batch and uses ``min(C, c)``, ``ctc_unity/criterions/
speech_to_speech_ctc_asr_st_criterion.py:149-167``; the agent's rule is what runs at inference.)

**What depends on what.** An encoder chunk is ``4C`` fbank frames, ``2C`` frames at the second
conv. With ``c | C`` (C = 8, 16, 32, ...) every conv chunk ends where an attention chunk ends, so a
completed chunk never changes when audio is appended. With C = 24 (c = 16) a depthwise conv chunk
straddles two attention chunks: chunk 2k's last 8 frames read chunk 2k+1 through the conv, so
StreamSpeech's own outputs for chunk 2k change one segment later (its agent re-encodes the whole
prefix every segment and so sees both values). Only whole blocks of ``R`` chunks are final.

**The streaming step** (:meth:`ChunkConformerEncoder.step`), one call per attention chunk:
- ``x`` ``[B, 2 + 4C, 80]``: fbank frames ``4Ck - 2 .. 4C(k+1) - 1`` of chunk ``k`` (zeros before
  the sentence): the first conv's 2 frames of left context ride in the window, not in the state;
- ``valid_frames`` ``[B]`` int32: real fbank frames of the chunk (``4C``, fewer for a sentence's last
  chunk). Masks at every resolution follow from it as in the full pass with that length
  (fbank ``t < v``, 20 ms ``2t < v``, 40 ms ``4t < v``), so a partial last chunk computes what the
  full pass computes; it is clamped to ``[1, 4C]`` (no fully masked attention row);
- state (``echostream.contract.conformer_encoder_contract``): ``keys`` / ``values`` ``[B, NL, K, D]``
  the sentence's self-attention K/V (right-aligned FIFO; every query sees all of it: the
  full-history chunk mask), ``subsample_context`` ``[B, 2, ch/2]`` the second conv's left context,
  ``conv_context`` ``[B, NL, P, D]`` every depthwise conv's left context, ``block_frames``
  ``[B, (R-1)C, D]`` (R > 1 only) the layer-0 input of the current block's earlier chunks,
  ``processed_chunks`` ``[B]`` int32;
- validity only from the counter: the window's lead, both conv contexts and the K/V cache hold real
  frames only as far back as the sentence goes, whatever a (random) state holds there;
- relative positions from constants: a window query ``i`` and key ``j`` of ``[cache (K); window
  (W)]`` are ``K + i - j`` frames apart whatever the counter says, so the position term is one
  matmul against a constant table of sinusoids and one constant-index gather (no Range);
- block mode (R > 1): the layer stack runs over the block's window of ``W`` frames (the earlier
  chunks of the block recomputed from ``block_frames``); K/V and the depthwise contexts are
  committed when the block completes. So ``y`` of chunk ``k`` equals the chunk-masked pass over the
  prefix ending at chunk ``k`` -- exactly what StreamSpeech's agent computes for that chunk at that
  call -- and at every block end it equals the full pass.

**Differences from StreamSpeech by design.**
- Batch padding (fidelity row b): frames past an utterance's length are zeroed before every conv
  and masked as attention keys, so an utterance padded in a batch gives what it gives alone.
  StreamSpeech masks nothing before its convs: padding leaks into the valid frames of the last
  chunk (batched != alone there; EchoStream batched == StreamSpeech alone to ~2e-6).
- Capacity: the K/V cache holds ``K`` frames; the runtime ends a sentence before it is full
  (StreamSpeech's history is unbounded within an utterance).
- The agent's call boundaries are not the chunk grid (it encodes whatever fbank frames have arrived,
  ``snip_edges``); the step is one whole chunk per call (``runtime.translator`` feeds it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echostream.contract import (BATCH, CONV1D_SUBSAMPLER_KERNEL, INT32, StageContract,
                                 TensorSpec, conformer_block_chunks,
                                 conformer_conv_chunk, conformer_states, state_contract)

from .attention import fifo_append, mask_bias, right_aligned_valid
from echostream.config import EncoderConfig, SentenceConfig
from .state import check_state, check_tensor, zero_state

FULL_CONTEXT = None  # chunk_size value meaning "no chunking" (StreamSpeech's offline model, C >= 999)
COUNTER = "processed_chunks"
FBANK_PER_FRAME = 4  # fbank frames per encoder frame


def conv_out_length(lengths: Tensor | int, stride: int = 2) -> Tensor | int:
    """Frames after one odd-kernel, ``kernel // 2``-padded conv of ``stride``: ``floor((L-1)/s)+1``."""
    return (lengths - 1) // stride + 1


def subsampled_length(lengths: Tensor | int) -> Tensor | int:
    """Encoder frames from ``lengths`` fbank frames (the 1-D rule applied twice)."""
    return conv_out_length(conv_out_length(lengths))


def time_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B]`` lengths -> ``[B, max_len]`` bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def scaled_index(length: int, scale: int, device=None) -> Tensor:
    """``[0, s, 2s, ...]`` int32 (a graph constant): frame ``t`` of a conv output that is ``s``
    fbank frames wide is valid iff ``s t < v`` for ``v`` valid fbank frames (``t < ceil(v / s)``)."""
    return torch.tensor([scale * t for t in range(length)], dtype=torch.int32, device=device)


def _blend(keep_new: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``keep_new`` (``[B, 1, ...]`` of 0.0 / 1.0) is 1, else ``old``; exact for
    finite values (no bool Where in the graph)."""
    return new * keep_new + old * (1.0 - keep_new)


class ChunkCausalConv1d(nn.Conv1d):
    """Conv1d over chunks: each chunk of ``chunk_size`` input frames is convolved with the
    ``kernel // 2`` real frames before it and zeros after its end, so no output reads past the end
    of its chunk. ``chunk_size=None`` is an ordinary conv with symmetric ``kernel // 2`` padding.

    ``forward``: ``[B, C_in, L]`` -> ``[B, C_out, (L-1)//stride + 1]`` (zeros before the input);
    ``step``: the same over whole chunks with the left context given.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (symmetric kernel//2 padding), got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)
        self.pad = kernel_size // 2

    def _check_chunk(self, chunk_size: int) -> None:
        if chunk_size < 1 or chunk_size % self.stride[0]:
            raise ValueError(
                f"conv chunk_size must be a positive multiple of stride {self.stride[0]}, got {chunk_size}"
            )

    def forward(self, x: Tensor, chunk_size: int | None = FULL_CONTEXT) -> Tensor:
        out_len = conv_out_length(x.shape[-1], self.stride[0])
        if chunk_size is None:
            return super().forward(F.pad(x, (self.pad, self.pad)))
        self._check_chunk(chunk_size)
        B, C_in, L = x.shape
        num_chunks = -(-L // chunk_size)
        # Left pad for the first chunk's context, right pad to whole chunks; then every chunk is a
        # window of pad + chunk_size frames (step chunk_size) followed by pad zeros.
        x = F.pad(x, (self.pad, num_chunks * chunk_size - L))
        windows = x.unfold(-1, self.pad + chunk_size, chunk_size)  # [B, C_in, N, pad + chunk]
        windows = F.pad(windows, (0, self.pad))  # [B, C_in, N, chunk + 2 pad]
        windows = windows.permute(0, 2, 1, 3).reshape(B * num_chunks, C_in, -1)
        y = super().forward(windows)  # [B*N, C_out, chunk // stride]
        y = y.reshape(B, num_chunks, self.out_channels, -1).permute(0, 2, 1, 3)
        return y.reshape(B, self.out_channels, -1)[..., :out_len]

    def step(self, context: Tensor | None, x: Tensor, chunk_size: int) -> Tensor:
        """Whole chunks with explicit left context (streaming; constant slices only).

        Args:
            context: ``[B, C_in, P]`` the ``P = kernel // 2`` input frames right before ``x``
                (None when P = 0: no zero-length tensors).
            x: ``[B, C_in, N]``, ``N`` a multiple of ``chunk_size``.
        Returns:
            ``[B, C_out, N / stride]``: what :meth:`forward` gives for these frames.
        """
        self._check_chunk(chunk_size)
        N = x.shape[-1]
        got = 0 if context is None else context.shape[-1]
        if N % chunk_size or got != self.pad:
            raise ValueError(f"conv step expected whole chunks of {chunk_size} and {self.pad} context "
                             f"frames, got {N} frames and {got} context")
        full = torch.cat([context, x], dim=-1) if self.pad else x
        outs = [super(ChunkCausalConv1d, self).forward(
                    F.pad(full[..., m:m + self.pad + chunk_size], (0, self.pad)))
                for m in range(0, N, chunk_size)]
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


class Conv1dSubsampler(nn.Module):
    """StreamSpeech's 4x front end: ``Conv1d(in, ch, k, s2) + GLU -> ch/2``, then
    ``Conv1d(ch/2, 2D, k, s2) + GLU -> D``, both chunk-causal with the conv chunk ``c``.

    Args (forward):
        features: ``[B, F, input_dim]``; lengths: ``[B]`` valid fbank frames;
        conv_chunk: ``c`` (each conv counts it in its own input frames) or None for plain convs.
    Returns:
        ``[B, T, D]`` with ``T = subsampled_length(F)`` (frames past a length are zero), and the
        ``[B]`` output lengths.
    """

    def __init__(self, input_dim: int, channels: int, d_model: int,
                 kernel_size: int = CONV1D_SUBSAMPLER_KERNEL):
        super().__init__()
        if channels % 2:
            raise ValueError(f"subsampling_channels must be even (GLU halves it), got {channels}")
        self.conv_layers = nn.ModuleList([
            ChunkCausalConv1d(input_dim, channels, kernel_size, stride=2),
            ChunkCausalConv1d(channels // 2, 2 * d_model, kernel_size, stride=2),
        ])

    @property
    def lead(self) -> int:
        """Fbank frames of left context the first conv needs (they ride in the step window)."""
        return self.conv_layers[0].pad

    def forward(self, features: Tensor, lengths: Tensor,
                conv_chunk: int | None = FULL_CONTEXT) -> tuple[Tensor, Tensor]:
        x = features.transpose(1, 2)  # [B, input_dim, F]
        for conv in self.conv_layers:
            x = x * time_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype)
            x = F.glu(conv(x, conv_chunk), dim=1)
            lengths = conv_out_length(lengths)
        x = x * time_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype)
        return x.transpose(1, 2), lengths

    def step(self, window: Tensor, valid: Tensor, context: Tensor, conv_chunk: int,
             chunks_before: Tensor) -> tuple[Tensor, Tensor]:
        """One encoder chunk.

        Args:
            window: ``[B, lead + 4C, input_dim]`` (see the module doc).
            valid: ``[B]`` int32 real fbank frames of the chunk (``1 .. 4C``).
            context: ``[B, P2, ch/2]`` the second conv's last input frames before this chunk.
            chunks_before: ``[B]`` int32 chunks of the sentence before this one: the lead and the
                context only hold real frames that far back (zeros before the sentence, whatever
                the window or the state holds there).
        Returns:
            (``[B, C, D]`` frames, zero past the valid ones; next ``context``).
        """
        lead, chunk_fbank = self.lead, window.shape[1] - self.lead
        v = valid.unsqueeze(1)
        keep = (scaled_index(chunk_fbank, 1, window.device) < v).to(window.dtype)  # [B, 4C]
        past = right_aligned_valid(chunks_before * chunk_fbank, lead).to(window.dtype)  # [B, lead]
        x = window.transpose(1, 2) * torch.cat([past, keep], dim=1).unsqueeze(1)  # [B, in, lead+4C]
        conv1, conv2 = self.conv_layers
        h = F.glu(conv1.step(x[..., :lead], x[..., lead:], conv_chunk), dim=1)  # [B, ch/2, 2C]
        h = h * (scaled_index(h.shape[-1], 2, h.device) < v).to(h.dtype).unsqueeze(1)
        ctx_valid = right_aligned_valid(chunks_before * h.shape[-1], context.shape[1])  # [B, P2]
        context = context * ctx_valid.to(context.dtype).unsqueeze(-1)
        out = F.glu(conv2.step(context.transpose(1, 2), h, conv_chunk), dim=1)  # [B, D, C]
        out = out * (scaled_index(out.shape[-1], 4, out.device) < v).to(out.dtype).unsqueeze(1)
        return out.transpose(1, 2), fifo_append(context, h.transpose(1, 2))


def relative_position_rows(first: int, last: int, d_model: int, device=None) -> Tensor:
    """ESPnet ``RelPositionalEncoding`` rows for relative positions ``first, first-1, ..., last``.

    Returns:
        ``[first - last + 1, d_model]`` fp32; the row of relative position ``r`` is ``sin(r w_i)``
        on even and ``cos(r w_i)`` on odd channels, ``w_i = 10000^(-2i/d)``.
    """
    rel = torch.arange(first, last - 1, -1, dtype=torch.float32, device=device)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    angles = rel.unsqueeze(1) * inv_freq  # [rows, d/2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(rel.shape[0], d_model)


def relative_position_encoding(length: int, d_model: int, device=None) -> Tensor:
    """``[2T-1, d_model]``: rows for relative positions ``T-1, T-2, ..., -(T-1)`` (row ``k`` is
    position ``r = T-1-k``), as ESPnet's ``RelPositionalEncoding`` gives for ``T`` frames."""
    return relative_position_rows(length - 1, -(length - 1), d_model, device)


def rel_shift(scores: Tensor) -> Tensor:
    """Transformer-XL shift: ``[..., T, 2T-1]`` scores against relative positions ``T-1 .. -(T-1)``
    -> ``[..., T, T]`` with ``out[..., i, j] = scores[..., i, T-1-i+j]`` (position ``i - j``)."""
    *lead, T, P = scores.shape
    padded = F.pad(scores, (1, 0))  # [..., T, 2T]
    shifted = padded.reshape(*lead, P + 1, T)[..., 1:, :]  # [..., 2T-1, T]
    return shifted.reshape(*lead, T, P)[..., :T]


def cache_position_index(cache: int, window: int) -> list[int]:
    """Flat gather index of the streaming position term.

    Scores of ``window`` queries against the table of :func:`relative_position_rows` ``(cache +
    window - 1) .. -(window - 1)`` are ``[W, cache + 2W - 1]``; query ``i`` and key ``j`` of
    ``[cache; window]`` are ``cache + i - j`` apart, i.e. table row ``W - 1 - i + j``.
    """
    rows = cache + 2 * window - 1
    return [i * rows + window - 1 - i + j for i in range(window) for j in range(cache + window)]


class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet relative-position self-attention (Transformer-XL §3.3): scores
    ``((q + u) k^T + shift((q + v) p^T)) / sqrt(d_k)`` with learned ``u``, ``v`` per head and
    ``p = linear_pos(pos_emb)`` (no bias)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.h, self.d_k = num_heads, d_model // num_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` -> ``[B, T, H, d_k]``."""
        return x.reshape(x.shape[0], x.shape[1], self.h, self.d_k)

    def _position_scores(self, q: Tensor, pos_emb: Tensor) -> Tensor:
        """``(q + v) p^T``: ``q`` ``[B, Tq, H, d_k]``, ``pos_emb`` ``[P, D]`` -> ``[B, H, Tq, P]``."""
        p = self.linear_pos(pos_emb).reshape(-1, self.h, self.d_k).permute(1, 2, 0)  # [H, d_k, P]
        return torch.matmul((q + self.pos_bias_v).transpose(1, 2).float(), p.float())

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, position: Tensor,
                allowed: Tensor) -> Tensor:
        """q ``[B, Tq, H, d_k]``, keys/values ``[B, Tk, D]``, position ``[B, H, Tq, Tk]``,
        allowed ``[B, Tq, Tk]`` -> ``[B, Tq, D]``."""
        B, Tq = q.shape[:2]
        k = self._heads(keys).transpose(1, 2)  # [B, H, Tk, d_k]
        v = self._heads(values).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2).float()  # [B, H, Tq, d_k]
        content = torch.matmul(q_u, k.float().transpose(-1, -2))  # [B, H, Tq, Tk]
        scores = (content + position) / math.sqrt(self.d_k) + mask_bias(allowed).unsqueeze(1)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, Tq, self.h * self.d_k)
        return self.linear_out(out)

    def forward(self, x: Tensor, pos_emb: Tensor, allowed: Tensor) -> Tensor:
        """
        Args:
            x: ``[B, T, D]``; pos_emb: ``[2T-1, D]`` (``relative_position_encoding``);
            allowed: ``[B, T, T]`` bool, True = query ``i`` may attend key ``j`` (no all-False row).
        Returns:
            ``[B, T, D]``.
        """
        q = self._heads(self.linear_q(x))
        position = rel_shift(self._position_scores(q, pos_emb))  # [B, H, T, T]
        return self._attend(q, self.linear_k(x), self.linear_v(x), position, allowed)

    def step(self, x: Tensor, cache_keys: Tensor, cache_values: Tensor, pos_table: Tensor,
             pos_index: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Window queries over ``[cache; window]`` keys.

        Args:
            x: ``[B, W, D]`` (after the layer norm); cache_keys / cache_values: ``[B, K, D]``;
            pos_table: ``[K + 2W - 1, D]`` rows of relative positions ``K + W - 1 .. -(W - 1)``;
            pos_index: ``[W (K + W)]`` int64 (:func:`cache_position_index`);
            allowed: ``[B, W, K + W]`` bool.
        Returns:
            (``[B, W, D]``, the window's keys and values ``[B, W, D]``).
        """
        q = self._heads(self.linear_q(x))
        k_new, v_new = self.linear_k(x), self.linear_v(x)
        table = self._position_scores(q, pos_table)  # [B, H, W, K + 2W - 1]
        B, H, W = table.shape[0], table.shape[1], table.shape[2]
        position = table.reshape(B, H, -1).index_select(2, pos_index).reshape(B, H, W, -1)
        keys, values = torch.cat([cache_keys, k_new], dim=1), torch.cat([cache_values, v_new], dim=1)
        return self._attend(q, keys, values, position, allowed), k_new, v_new


class FeedForwardModule(nn.Module):
    """``LN -> Linear(D, ffn) -> Swish -> Linear(ffn, D)``: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d_model)
        self.w_1 = nn.Linear(d_model, ffn_dim)
        self.w_2 = nn.Linear(ffn_dim, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.silu(self.w_1(self.layer_norm(x))))


class ConvolutionModule(nn.Module):
    """``LN -> pointwise D->2D -> GLU -> chunk-causal depthwise conv -> BatchNorm -> Swish ->
    pointwise D->D``, no conv biases. ``[B, T, D]`` (+ ``[B, T]`` valid mask) -> ``[B, T, D]``."""

    def __init__(self, d_model: int, kernel_size: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d_model)
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=False)
        self.depthwise_conv = ChunkCausalConv1d(d_model, d_model, kernel_size, groups=d_model,
                                                bias=False)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=False)

    def _gated(self, x: Tensor, valid: Tensor) -> Tensor:
        """``[B, T, D]`` -> the depthwise conv's input ``[B, D, T]``, zero on invalid frames
        (padding must not leak into a valid frame's kernel)."""
        h = F.glu(self.pointwise_conv1(self.layer_norm(x).transpose(1, 2)), dim=1)
        return h * valid.unsqueeze(1).to(h.dtype)

    def _output(self, h: Tensor) -> Tensor:
        return self.pointwise_conv2(F.silu(self.batch_norm(h))).transpose(1, 2)

    def forward(self, x: Tensor, valid: Tensor, conv_chunk: int | None) -> Tensor:
        return self._output(self.depthwise_conv(self._gated(x, valid), conv_chunk))

    def step(self, x: Tensor, valid: Tensor, context: Tensor | None,
             conv_chunk: int) -> tuple[Tensor, Tensor]:
        """Window ``x`` ``[B, W, D]`` with the depthwise conv's ``context`` ``[B, P, D]`` (None when
        P = 0) -> (``[B, W, D]``, the conv's input ``[B, W, D]``, whose tail is the next context)."""
        h = self._gated(x, valid)  # [B, D, W]
        ctx = None if context is None else context.transpose(1, 2)
        return self._output(self.depthwise_conv.step(ctx, h, conv_chunk)), h.transpose(1, 2)


class ChunkConformerEncoderLayer(nn.Module):
    """Macaron Conformer block, pre-LN:
    ``x + FFN1/2 -> + MHA -> + Conv -> + FFN2/2 -> LN``. ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, kernel_size: int):
        super().__init__()
        self.ffn1 = FeedForwardModule(d_model, ffn_dim)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.self_attn = RelPositionMultiHeadedAttention(d_model, num_heads)
        self.conv_module = ConvolutionModule(d_model, kernel_size)
        self.ffn2 = FeedForwardModule(d_model, ffn_dim)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, pos_emb: Tensor, allowed: Tensor, valid: Tensor,
                conv_chunk: int | None) -> Tensor:
        """x ``[B, T, D]``, pos_emb ``[2T-1, D]``, allowed ``[B, T, T]``, valid ``[B, T]``."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.self_attn(self.self_attn_layer_norm(x), pos_emb, allowed)
        x = x + self.conv_module(x, valid, conv_chunk)
        x = x + 0.5 * self.ffn2(x)
        return self.final_layer_norm(x)

    def step(self, x: Tensor, cache: dict[str, Tensor], positions: tuple[Tensor, Tensor],
             allowed: Tensor, valid: Tensor, conv_chunk: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One window ``x`` ``[B, W, D]``; ``cache``: this layer's ``keys`` / ``values`` ``[B, K, D]``
        and ``conv_context`` ``[B, P, D]`` (absent when P = 0); ``positions``: (table, index) of
        :meth:`RelPositionMultiHeadedAttention.step`; ``valid`` ``[B, W]`` float.

        Returns:
            (``[B, W, D]``, the window's ``keys``, ``values`` and depthwise input ``conv_input``,
            each ``[B, W, D]``: what the caller appends to the caches when they are final).
        """
        x = x + 0.5 * self.ffn1(x)
        attended, k, v = self.self_attn.step(self.self_attn_layer_norm(x), cache["keys"],
                                             cache["values"], *positions, allowed)
        x = x + attended
        conv, conv_input = self.conv_module.step(x, valid, cache.get("conv_context"), conv_chunk)
        x = x + conv
        x = x + 0.5 * self.ffn2(x)
        return self.final_layer_norm(x), {"keys": k, "values": v, "conv_input": conv_input}


def chunk_attention_mask(length: int, chunk_size: int | None, device=None) -> Tensor:
    """``[T, T]`` bool: frame ``i`` may attend ``j`` iff ``j < (i // C + 1) * C`` (all of its own
    chunk and every earlier frame). ``chunk_size=None``: full attention."""
    idx = torch.arange(length, device=device)
    if chunk_size is None:
        return torch.ones(length, length, dtype=torch.bool, device=device)
    chunk_end = (idx // chunk_size + 1) * chunk_size  # [T]
    return idx.unsqueeze(0) < chunk_end.unsqueeze(1)


def conformer_state_contract(cfg: EncoderConfig, max_source_frames: int) -> StageContract:
    """The encoder stage's state specs for ``cfg`` and a sentence of ``max_source_frames``."""
    return state_contract("encoder", conformer_states(
        cfg.num_layers, cfg.d_model, max_source_frames, cfg.subsampling_channels,
        cfg.depthwise_kernel, cfg.chunk_size))


class ChunkConformerEncoder(nn.Module):
    """StreamSpeech's encoder. ``forward(features [B, F, 80], lengths [B]) -> dict`` with the same
    contract as ``EchoStreamEncoder``: ``{"encoder_out": [[T, B, D]], "encoder_padding_mask":
    [[B, T] bool, True = padding], "encoder_lengths": [[B]]}``, ``T = subsampled_length(F)``;
    ``step(x, valid_frames, state) -> (y [B, C, D], next_state)`` (see the module doc).

    ``cfg.chunk_size`` (encoder frames, 8 = 320 ms) is the default chunk and the one ``step``
    serves; ``forward`` may override it per call, as StreamSpeech's agent does
    (``segment_ms // 40``); None = offline, full attention and plain convs.
    """

    def __init__(self, cfg: EncoderConfig,
                 max_source_frames: int = SentenceConfig.max_source_frames):
        super().__init__()
        if cfg.kind != "conformer" or cfg.subsampling != "conv1d":
            raise ValueError(
                "ChunkConformerEncoder expects encoder kind 'conformer' with subsampling 'conv1d', "
                f"got kind {cfg.kind!r}, subsampling {cfg.subsampling!r}"
            )
        self.cfg = cfg
        self.input_dim, self.d_model, self.chunk_size = cfg.input_dim, cfg.d_model, cfg.chunk_size
        self.max_source_frames = int(max_source_frames)
        self.subsample = Conv1dSubsampler(cfg.input_dim, cfg.subsampling_channels, cfg.d_model)
        self.embed_scale = math.sqrt(cfg.d_model)
        self.linear = nn.Linear(cfg.d_model, cfg.d_model)
        self.conformer_layers = nn.ModuleList(
            ChunkConformerEncoderLayer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.depthwise_kernel)
            for _ in range(cfg.num_layers)
        )
        self._init_streaming()

    # ---- streaming constants -------------------------------------------------------------------

    def _init_streaming(self) -> None:
        """Constants of the step (buffers, not weights: rebuilt from the config, never saved)."""
        try:
            self.contract: StageContract | None = conformer_state_contract(self.cfg,
                                                                           self.max_source_frames)
        except ValueError as exc:  # a chunk size that cannot stream still has the full pass
            self.contract, self.streaming_error = None, str(exc)
            return
        self.conv_chunk = conformer_conv_chunk(self.chunk_size)
        self.block_chunks = conformer_block_chunks(self.chunk_size)
        W, K = self.window_frames, self.max_source_frames
        self.register_buffer("stream_pos_table",
                             relative_position_rows(K + W - 1, -(W - 1), self.d_model), persistent=False)
        self.register_buffer("stream_pos_index",
                             torch.tensor(cache_position_index(K, W), dtype=torch.int64), persistent=False)
        self.register_buffer("stream_chunk_mask", chunk_attention_mask(W, self.chunk_size),
                             persistent=False)

    @property
    def window_frames(self) -> int:
        """Encoder frames the layer stack runs on per step: ``W = R C``."""
        return self.block_chunks * self.chunk_size

    @property
    def hop_frames(self) -> int:
        """Fbank frames per step (one chunk): ``4C``."""
        return FBANK_PER_FRAME * self.chunk_size

    @property
    def fbank_window(self) -> int:
        """Fbank frames of a step window: ``lead + 4C``."""
        return self.subsample.lead + self.hop_frames

    def initial_state(self, batch: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """Zero caches and contexts, counter 0 (a fresh sentence)."""
        return zero_state(self._streaming_contract(), batch, device)

    def _streaming_contract(self) -> StageContract:
        if self.contract is None:
            raise ValueError(self.streaming_error)
        return self.contract

    # ---- full utterance ------------------------------------------------------------------------

    def _check(self, features: Tensor, lengths: Tensor) -> None:
        if features.dim() != 3 or features.shape[2] != self.input_dim:
            raise ValueError(f"features expected [B, F, {self.input_dim}], got {list(features.shape)}")
        if lengths.shape != (features.shape[0],) or lengths.dtype.is_floating_point:
            raise ValueError(
                f"lengths expected an integer [B={features.shape[0]}] tensor, got "
                f"{lengths.dtype} {list(lengths.shape)}"
            )
        if bool((lengths < 1).any()) or bool((lengths > features.shape[1]).any()):
            raise ValueError(f"lengths must lie in [1, F={features.shape[1]}], got {lengths.tolist()}")

    def forward(self, features: Tensor, lengths: Tensor,
                chunk_size: int | None | str = "config") -> dict[str, list[Tensor]]:
        """features ``[B, F, input_dim]``, lengths ``[B]`` -> the encoder-out dict (see class doc).

        ``chunk_size``: attention chunk in encoder frames (the convs use ``conv_chunk(C)``); the
        default ``"config"`` uses ``cfg.chunk_size``; None = offline.
        """
        self._check(features, lengths)
        chunk = self.chunk_size if chunk_size == "config" else chunk_size
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk}")
        conv_chunk = None if chunk is None else conformer_conv_chunk(chunk)
        x, out_lengths = self.subsample(features, lengths, conv_chunk)  # [B, T, D]
        T = x.shape[1]
        pos_emb = relative_position_encoding(T, self.d_model, x.device).to(x.dtype)  # [2T-1, D]
        x = self.linear(x * self.embed_scale)
        valid = time_mask(out_lengths, T)  # [B, T]
        allowed = chunk_attention_mask(T, chunk, x.device).unsqueeze(0) & valid.unsqueeze(1)
        for layer in self.conformer_layers:
            x = layer(x, pos_emb, allowed, valid, conv_chunk)
        return {
            "encoder_out": [x.transpose(0, 1)],  # [T, B, D]
            "encoder_padding_mask": [~valid],  # [B, T]
            "encoder_lengths": [out_lengths],
        }

    @torch.no_grad()
    def encode_prefix(self, features_prefix: Tensor,
                      chunk_size: int | None | str = "config") -> dict[str, list[Tensor]]:
        """What StreamSpeech's agent does every segment: encode the whole received prefix again.

        Args:
            features_prefix: ``[F, input_dim]`` or ``[B, F, input_dim]`` (all ``F`` frames valid).
        Returns:
            the ``forward`` dict over all ``subsampled_length(F)`` frames.
        """
        if features_prefix.dim() == 2:
            features_prefix = features_prefix.unsqueeze(0)
        B, num_frames = features_prefix.shape[:2]
        lengths = torch.full((B,), num_frames, dtype=torch.int64, device=features_prefix.device)
        return self.forward(features_prefix, lengths, chunk_size)

    @torch.no_grad()
    def chunk_outputs(self, features: Tensor) -> Tensor:
        """What the chained steps must emit for one utterance: chunk ``k`` as the chunk-masked pass
        over the prefix ending at chunk ``k`` computes it (StreamSpeech's agent at that call).

        With one chunk per block (R = 1) completed chunks never change, so this is the full pass;
        with R > 1 the earlier chunks of a block are their provisional values.

        Args:
            features: ``[F, input_dim]`` (all valid).
        Returns:
            ``[subsampled_length(F), D]``.
        """
        full = self.encode_prefix(features)["encoder_out"][0][:, 0]
        if self.block_chunks == 1:
            return full
        C, hop = self.chunk_size, self.hop_frames
        parts = [self.encode_prefix(features[:(k + 1) * hop])["encoder_out"][0][k * C:(k + 1) * C, 0]
                 for k in range(-(-full.shape[0] // C))]
        return torch.cat(parts)

    # ---- one chunk -----------------------------------------------------------------------------

    def _check_step(self, x: Tensor, valid_frames: Tensor, state: dict[str, Tensor]) -> None:
        contract = self._streaming_contract()
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.fbank_window, self.input_dim):
            raise ValueError(f"encoder step: x expected [B, {self.fbank_window}, {self.input_dim}], "
                             f"got {list(x.shape)}")
        check_tensor("encoder", TensorSpec("valid_frames", (BATCH,), INT32), valid_frames, x.shape[0])
        check_state(contract, state, x.shape[0])

    def step(self, x: Tensor, valid_frames: Tensor,
             state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One attention chunk (see the module doc).

        Args:
            x: ``[B, lead + 4C, input_dim]`` fbank window of chunk ``k``.
            valid_frames: ``[B]`` int32 real fbank frames of the chunk (clamped to ``[1, 4C]``).
            state: the contract state; :meth:`initial_state` for a new sentence.
        Returns:
            (``y`` ``[B, C, D]``, next state with the same names, shapes and dtypes).
        """
        self._check_step(x, valid_frames, state)
        counter = state[COUNTER]
        v = torch.minimum(torch.maximum(valid_frames, torch.ones_like(valid_frames)),
                          torch.full_like(valid_frames, self.hop_frames))
        frames, next_sub = self.subsample.step(x, v, state["subsample_context"], self.conv_chunk,
                                               counter)
        window, position = self._block_window(self.linear(frames * self.embed_scale), counter, state)
        allowed, valid = self._step_masks(counter, position, v)
        out, finals = self._layers_step(window, state, allowed, valid,
                                        self._frames_before_block(counter, position))
        next_state = self._commit(state, finals, position)
        next_state["subsample_context"] = next_sub
        next_state[COUNTER] = counter + 1
        if self.block_chunks > 1:
            next_state["block_frames"] = window[:, :self.window_frames - self.chunk_size]
        return self._current_chunk(out, position), next_state

    def _block_position(self, counter: Tensor) -> Tensor | None:
        """``[B]`` int32 index of the current chunk within its block (None when R = 1)."""
        R = self.block_chunks
        if R == 1:
            return None
        return torch.remainder(counter, R)

    def _block_window(self, x0: Tensor, counter: Tensor,
                      state: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The layer stack's input ``[B, W, D]``: the block's earlier chunks (from ``block_frames``),
        this chunk at its position, zeros after; and the position (None when R = 1)."""
        position = self._block_position(counter)
        if position is None:
            return x0, None
        C, pending, parts = self.chunk_size, state["block_frames"], []
        for q in range(self.block_chunks):
            part = x0 * (position == q).to(x0.dtype).view(-1, 1, 1)
            if q < self.block_chunks - 1:
                before = (position > q).to(x0.dtype).view(-1, 1, 1)
                part = part + pending[:, q * C:(q + 1) * C] * before
            parts.append(part)
        return torch.cat(parts, dim=1), position

    def _frames_before_block(self, counter: Tensor, position: Tensor | None) -> Tensor:
        """``[B]`` int32 encoder frames of the sentence before the current block (all committed)."""
        chunks = counter if position is None else counter - position
        return chunks * self.chunk_size

    def _step_masks(self, counter: Tensor, position: Tensor | None,
                    v: Tensor) -> tuple[Tensor, Tensor]:
        """(allowed ``[B, W, K + W]`` bool, window frame validity ``[B, W]`` float).

        Cache slots hold the frames of completed blocks (right-aligned); window slot ``s`` is valid
        iff ``4 s < 4 C p + v`` (earlier chunks of the block, then ``ceil(v / 4)`` frames of this
        one); within the window the chunk mask applies; every query sees the whole cache.
        """
        C, W, K = self.chunk_size, self.window_frames, self.max_source_frames
        cache_valid = right_aligned_valid(self._frames_before_block(counter, position), K)  # [B, K]
        offset = v if position is None else position * (FBANK_PER_FRAME * C) + v
        window_valid = scaled_index(W, FBANK_PER_FRAME, v.device).unsqueeze(0) < offset.unsqueeze(1)
        allowed = torch.cat([cache_valid.unsqueeze(1).expand(-1, W, -1),
                             self.stream_chunk_mask.unsqueeze(0) & window_valid.unsqueeze(1)], dim=2)
        return allowed, window_valid.to(torch.float32)

    def _layers_step(self, x: Tensor, state: dict[str, Tensor], allowed: Tensor, valid: Tensor,
                     frames_before: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Every layer on the window -> (output ``[B, W, D]``, per-layer window K/V/conv input).
        A depthwise context holds real frames only as far back as the sentence goes (counter)."""
        names = [n for n in ("keys", "values", "conv_context") if n in state]
        per_layer = {n: state[n].unbind(dim=1) for n in names}
        if "conv_context" in state:
            real = right_aligned_valid(frames_before, state["conv_context"].shape[2])  # [B, P]
            per_layer["conv_context"] = [c * real.to(c.dtype).unsqueeze(-1)
                                         for c in per_layer["conv_context"]]
        positions = (self.stream_pos_table.to(x.dtype), self.stream_pos_index)
        finals = []
        for i, layer in enumerate(self.conformer_layers):
            x, final = layer.step(x, {n: per_layer[n][i] for n in names}, positions, allowed,
                                  valid, self.conv_chunk)
            finals.append(final)
        return x, finals

    def _commit(self, state: dict[str, Tensor], finals: list[dict[str, Tensor]],
                position: Tensor | None) -> dict[str, Tensor]:
        """Next K/V caches and depthwise contexts: the window appended once its block is complete
        (always when R = 1), else the state as it was."""
        pairs = [("keys", "keys"), ("values", "values"), ("conv_context", "conv_input")]
        out = {}
        for name, key in pairs:
            if name not in state:
                continue
            old = state[name].unbind(dim=1)
            new = [fifo_append(old[i], f[key]) for i, f in enumerate(finals)]
            if position is not None:
                done = (position == self.block_chunks - 1).to(state[name].dtype).view(-1, 1, 1)
                new = [_blend(done, n, o) for n, o in zip(new, old)]
            out[name] = torch.stack(new, dim=1)
        return out

    def _current_chunk(self, out: Tensor, position: Tensor | None) -> Tensor:
        """``[B, W, D]`` -> this chunk's ``[B, C, D]``."""
        if position is None:
            return out
        C = self.chunk_size
        parts = [out[:, q * C:(q + 1) * C] * (position == q).to(out.dtype).view(-1, 1, 1)
                 for q in range(self.block_chunks)]
        chunk = parts[0]
        for part in parts[1:]:  # exactly one term is non-zero
            chunk = chunk + part
        return chunk
