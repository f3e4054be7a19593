"""StreamSpeech's chunk-based Conformer encoder (the released baseline, streamspeech-facts.md §1-§2).

Fbank ``[B, F, 80]`` -> ``Conv1dSubsampler`` (two chunk-causal stride-2 Conv1d + GLU, 4x) -> x16 ->
``Linear(D, D)`` -> 12 ``ChunkConformerEncoderLayer`` (macaron FFN halves, ESPnet relative-position
MHA, chunk-causal conv module, final LN) -> ``[T, B, D]``.

"Chunk-based" means nothing computed for a completed chunk of ``C`` encoder frames ever looks past
that chunk's end: self-attention sees every frame before the end of its own chunk (full history, no
left-context limit), and every convolution is cut into chunks that see ``kernel // 2`` real frames
of left context and zeros after the chunk end. So StreamSpeech's agent re-encodes the whole prefix
at every segment (there is no streaming state) and the outputs of completed chunks do not change.

Parameter names follow fairseq's ``S2TConformerEncoder`` (``subsample.conv_layers.*``, ``linear``,
``conformer_layers.*``) so a released checkpoint's encoder maps one to one. Dropout is left out: this
is the inference reference.

Two deliberate choices (the released code leaves them open):
- Chunk sizes of the subsampler convs are aligned to the attention chunk: ``4C`` fbank frames for
  the first conv, ``2C`` frames for the second, ``C`` for the depthwise convs, so encoder chunk
  ``n`` depends on fbank frames ``[0, 4C(n+1))`` only. (StreamSpeech's agent picks a conv chunk
  of 16 if C >= 16 else 8, the same as C at its 320 / 640 ms settings.)
- Frames past an utterance's length are zeroed before every convolution, so an utterance padded in
  a batch gives the same frames as alone (fairseq lets padding leak into the last chunk).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import mask_bias
from .config import EncoderConfig

FULL_CONTEXT = None  # chunk_size value meaning "no chunking" (StreamSpeech's offline model, C >= 999)


def conv_out_length(lengths: Tensor | int, stride: int = 2) -> Tensor | int:
    """Frames after one odd-kernel, ``kernel // 2``-padded conv of ``stride``: ``floor((L-1)/s)+1``."""
    return (lengths - 1) // stride + 1


def subsampled_length(lengths: Tensor | int) -> Tensor | int:
    """Encoder frames from ``lengths`` fbank frames (the 1-D rule applied twice)."""
    return conv_out_length(conv_out_length(lengths))


def time_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B]`` lengths -> ``[B, max_len]`` bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class ChunkCausalConv1d(nn.Conv1d):
    """Conv1d over chunks: each chunk of ``chunk_size`` input frames is convolved with the
    ``kernel // 2`` real frames before it and zeros after its end, so no output reads past the end
    of its chunk. ``chunk_size=None`` is an ordinary conv with symmetric ``kernel // 2`` padding.

    Input ``[B, C_in, L]`` -> output ``[B, C_out, (L-1)//stride + 1]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (symmetric kernel//2 padding), got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)
        self.pad = kernel_size // 2

    def forward(self, x: Tensor, chunk_size: int | None = FULL_CONTEXT) -> Tensor:
        out_len = conv_out_length(x.shape[-1], self.stride[0])
        if chunk_size is None:
            return super().forward(F.pad(x, (self.pad, self.pad)))
        if chunk_size < 1 or chunk_size % self.stride[0]:
            raise ValueError(
                f"conv chunk_size must be a positive multiple of stride {self.stride[0]}, got {chunk_size}"
            )
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


class Conv1dSubsampler(nn.Module):
    """StreamSpeech's 4x front end: ``Conv1d(in, ch, k, s2) + GLU -> ch/2``, then
    ``Conv1d(ch/2, 2D, k, s2) + GLU -> D``, both chunk-causal.

    Args (forward):
        features: ``[B, F, input_dim]``; lengths: ``[B]`` valid fbank frames;
        chunk_size: attention chunk in encoder frames (the convs use ``4C`` and ``2C`` of their own
        input frames) or None for plain convs.
    Returns:
        ``[B, T, D]`` with ``T = subsampled_length(F)`` (frames past a length are zero), and the
        ``[B]`` output lengths.
    """

    def __init__(self, input_dim: int, channels: int, d_model: int, kernel_size: int = 5):
        super().__init__()
        if channels % 2:
            raise ValueError(f"subsampling_channels must be even (GLU halves it), got {channels}")
        self.conv_layers = nn.ModuleList([
            ChunkCausalConv1d(input_dim, channels, kernel_size, stride=2),
            ChunkCausalConv1d(channels // 2, 2 * d_model, kernel_size, stride=2),
        ])

    def forward(self, features: Tensor, lengths: Tensor,
                chunk_size: int | None = FULL_CONTEXT) -> tuple[Tensor, Tensor]:
        x = features.transpose(1, 2)  # [B, input_dim, F]
        for i, conv in enumerate(self.conv_layers):
            # Layer i reads frames of 10 * 2^i ms: an encoder chunk of C frames is C * 4 / 2^i of them.
            conv_chunk = None if chunk_size is None else chunk_size * (4 >> i)
            x = x * time_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype)
            x = F.glu(conv(x, conv_chunk), dim=1)
            lengths = conv_out_length(lengths)
        x = x * time_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype)
        return x.transpose(1, 2), lengths


def relative_position_encoding(length: int, d_model: int, device=None) -> Tensor:
    """ESPnet ``RelPositionalEncoding``: sinusoids of relative positions ``T-1, T-2, ..., -(T-1)``.

    Returns:
        ``[2T-1, d_model]`` fp32; row ``k`` encodes relative position ``r = T-1-k`` as
        ``sin(r w_i)`` on even and ``cos(r w_i)`` on odd channels, ``w_i = 10000^(-2i/d)``.
    """
    rel = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)  # [2T-1]
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    angles = rel.unsqueeze(1) * inv_freq  # [2T-1, d/2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(2 * length - 1, d_model)


def rel_shift(scores: Tensor) -> Tensor:
    """Transformer-XL shift: ``[..., T, 2T-1]`` scores against relative positions ``T-1 .. -(T-1)``
    -> ``[..., T, T]`` with ``out[..., i, j] = scores[..., i, T-1-i+j]`` (position ``i - j``)."""
    *lead, T, P = scores.shape
    padded = F.pad(scores, (1, 0))  # [..., T, 2T]
    shifted = padded.reshape(*lead, P + 1, T)[..., 1:, :]  # [..., 2T-1, T]
    return shifted.reshape(*lead, T, P)[..., :T]


class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet relative-position self-attention (Transformer-XL §3.3): scores
    ``((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k)`` with learned ``u``, ``v`` per head and
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

    def forward(self, x: Tensor, pos_emb: Tensor, allowed: Tensor) -> Tensor:
        """
        Args:
            x: ``[B, T, D]``; pos_emb: ``[2T-1, D]`` (``relative_position_encoding``);
            allowed: ``[B, T, T]`` bool, True = query ``i`` may attend key ``j`` (no all-False row).
        Returns:
            ``[B, T, D]``.
        """
        B, T, D = x.shape
        q = self._heads(self.linear_q(x))  # [B, T, H, d_k]
        k = self._heads(self.linear_k(x)).transpose(1, 2)  # [B, H, T, d_k]
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self.linear_pos(pos_emb).reshape(-1, self.h, self.d_k).permute(1, 2, 0)  # [H, d_k, 2T-1]
        q_u = (q + self.pos_bias_u).transpose(1, 2).float()  # [B, H, T, d_k]
        q_v = (q + self.pos_bias_v).transpose(1, 2).float()
        content = torch.matmul(q_u, k.float().transpose(-1, -2))  # [B, H, T, T]
        position = rel_shift(torch.matmul(q_v, p.float()))  # [B, H, T, T]
        scores = (content + position) / math.sqrt(self.d_k) + mask_bias(allowed).unsqueeze(1)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, D)
        return self.linear_out(out)


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

    def forward(self, x: Tensor, valid: Tensor, chunk_size: int | None) -> Tensor:
        x = F.glu(self.pointwise_conv1(self.layer_norm(x).transpose(1, 2)), dim=1)  # [B, D, T]
        x = x * valid.unsqueeze(1).to(x.dtype)  # padding must not leak into a valid frame's kernel
        x = F.silu(self.batch_norm(self.depthwise_conv(x, chunk_size)))
        return self.pointwise_conv2(x).transpose(1, 2)


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
                chunk_size: int | None) -> Tensor:
        """x ``[B, T, D]``, pos_emb ``[2T-1, D]``, allowed ``[B, T, T]``, valid ``[B, T]``."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.self_attn(self.self_attn_layer_norm(x), pos_emb, allowed)
        x = x + self.conv_module(x, valid, chunk_size)
        x = x + 0.5 * self.ffn2(x)
        return self.final_layer_norm(x)


def chunk_attention_mask(length: int, chunk_size: int | None, device=None) -> Tensor:
    """``[T, T]`` bool: frame ``i`` may attend ``j`` iff ``j < (i // C + 1) * C`` (all of its own
    chunk and every earlier frame). ``chunk_size=None``: full attention."""
    idx = torch.arange(length, device=device)
    if chunk_size is None:
        return torch.ones(length, length, dtype=torch.bool, device=device)
    chunk_end = (idx // chunk_size + 1) * chunk_size  # [T]
    return idx.unsqueeze(0) < chunk_end.unsqueeze(1)


class ChunkConformerEncoder(nn.Module):
    """StreamSpeech's encoder. ``forward(features [B, F, 80], lengths [B]) -> dict`` with the same
    contract as ``EchoStreamEncoder``: ``{"encoder_out": [[T, B, D]], "encoder_padding_mask":
    [[B, T] bool, True = padding], "encoder_lengths": [[B]]}``, ``T = subsampled_length(F)``.

    ``cfg.chunk_size`` (encoder frames, 8 = 320 ms) is the default chunk; ``forward`` may override it
    per call, as StreamSpeech's agent does (``segment_ms // 40``); None = offline, full attention.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.kind != "conformer" or cfg.subsampling != "conv1d":
            raise ValueError(
                "ChunkConformerEncoder expects encoder kind 'conformer' with subsampling 'conv1d', "
                f"got kind {cfg.kind!r}, subsampling {cfg.subsampling!r}"
            )
        self.input_dim, self.d_model, self.chunk_size = cfg.input_dim, cfg.d_model, cfg.chunk_size
        self.subsample = Conv1dSubsampler(cfg.input_dim, cfg.subsampling_channels, cfg.d_model)
        self.embed_scale = math.sqrt(cfg.d_model)
        self.linear = nn.Linear(cfg.d_model, cfg.d_model)
        self.conformer_layers = nn.ModuleList(
            ChunkConformerEncoderLayer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.depthwise_kernel)
            for _ in range(cfg.num_layers)
        )

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

        ``chunk_size``: encoder frames per chunk; the default ``"config"`` uses ``cfg.chunk_size``.
        """
        self._check(features, lengths)
        chunk = self.chunk_size if chunk_size == "config" else chunk_size
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk}")
        x, out_lengths = self.subsample(features, lengths, chunk)  # [B, T, D]
        T = x.shape[1]
        pos_emb = relative_position_encoding(T, self.d_model, x.device).to(x.dtype)  # [2T-1, D]
        x = self.linear(x * self.embed_scale)
        valid = time_mask(out_lengths, T)  # [B, T]
        allowed = chunk_attention_mask(T, chunk, x.device).unsqueeze(0) & valid.unsqueeze(1)
        for layer in self.conformer_layers:
            x = layer(x, pos_emb, allowed, valid, chunk)
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
