"""Pre-LN transformer layers whose self-attention can run over a fixed-capacity K/V cache.

Shared by the ST CTC head, the MT decoder, the T2U encoder and the unit decoder (fairseq
``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` with ``normalize_before=True``; parameter
names follow fairseq so checkpoints map one to one).

Window convention (one rule, so that a streaming ``step`` equals a full ``forward`` however the
positions are chunked): a cache of capacity ``C`` holds the ``C`` positions before the current
step. A step with ``N`` new rows attends over ``cat(cache, new)`` (``C + N`` keys); the new row at
absolute position ``t`` may attend positions ``[t - C, t]``. Cache slot ``j`` of a right-aligned
FIFO written ``count`` times holds position ``count - C + j``, so row ``i`` of the step (position
``count + i``) sees slot ``j`` iff the slot is valid and ``j >= i``. The full pass uses the
equivalent band mask ``t - C <= j <= t``.

Layers return the projected keys/values of their new rows; callers append them to the caches
(``fifo_append``) and stack the per-layer caches at the end (no in-place writes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from echostream.models.attention import MultiheadAttention, constant_index, right_aligned_valid


# ---- masks --------------------------------------------------------------------------------------


def band_allowed(length: int, context: int, device: torch.device | None = None) -> Tensor:
    """Full-pass causal window mask.

    Returns:
        ``[T, T]`` bool; row ``t`` may attend key ``j`` iff ``t - context <= j <= t``.
    """
    idx = constant_index(length, device)  # a graph constant (no Range) in sentence graphs
    lag = idx.unsqueeze(1) - idx.unsqueeze(0)  # [T, T]: t - j
    return (lag >= 0) & (lag <= context)


def window_allowed(count: Tensor, capacity: int, new: int) -> Tensor:
    """Streaming causal window mask over ``cat(cache, new)``.

    Args:
        count: ``[B]`` int32, positions written to the cache before this step.
        capacity: cache slots ``C``.
        new: rows ``N`` in this step.
    Returns:
        ``[B, N, C + N]`` bool (True = may attend). Row ``i`` always sees itself, so no row is
        fully masked.
    """
    # Constant parts are Python-built tensors (graph constants, no Range when exported).
    in_window = torch.tensor([[j >= i for j in range(capacity)] for i in range(new)],
                             device=count.device)  # [N, C]
    causal = torch.tensor([[k <= i and i - k <= capacity for k in range(new)] for i in range(new)],
                          device=count.device)  # [N, N]
    cache_ok = right_aligned_valid(count, capacity).unsqueeze(1) & in_window  # [B, N, C]
    new_ok = causal.unsqueeze(0).expand(count.shape[0], new, new)  # [B, N, N]
    return torch.cat([cache_ok, new_ok], dim=-1)


def key_padding_allowed(allowed: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Combine a square ``[T, T]`` window mask with a ``[B, T]`` key padding mask (True = pad).

    As fairseq: a padded key is never attended, by any row (a padded row included). Only a row
    left with no key at all keeps its own position (fairseq would give NaN there; such rows are
    padding whose output nobody reads).

    Returns:
        ``[B or 1, T, T]`` bool.
    """
    if padding_mask is None:
        return allowed.unsqueeze(0)
    T = allowed.shape[0]
    idx = constant_index(T, allowed.device)
    diagonal = (idx.unsqueeze(1) == idx.unsqueeze(0)).unsqueeze(0)  # no eye: int32 constants only
    kept = allowed.unsqueeze(0) & (~padding_mask).unsqueeze(1)  # [B, T, T]
    empty = ~kept.any(dim=-1, keepdim=True)  # [B, T, 1]
    return kept | (diagonal & empty)


# ---- input checks -------------------------------------------------------------------------------


def check_input(where: str, name: str, x: Tensor, shape: tuple[int | None, ...],
                dtype: torch.dtype | tuple[torch.dtype, ...] | None = None) -> None:
    """Raise ``ValueError`` (expected vs got) unless ``x`` has ``len(shape)`` dims matching every
    non-None entry of ``shape`` and, if given, one of the ``dtype``s."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    expected = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
    if x.dim() != len(shape) or any(d is not None and x.shape[i] != d for i, d in enumerate(shape)):
        raise ValueError(f"{where}: {name} shape expected {expected}, got {list(x.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if x.dtype not in allowed:
            raise ValueError(f"{where}: {name} dtype expected {' or '.join(map(str, allowed))}, "
                             f"got {x.dtype}")


# ---- layers -------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """``fc2(dropout(relu(fc1(x))))``: ``[..., D] -> [..., D]``."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.activation_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(torch.relu(self.fc1(x))))


def _self_attention_kv(attn: MultiheadAttention, h: Tensor, past_keys: Tensor | None,
                       past_values: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project the new rows ``h`` ``[B, N, D]`` and prepend the cached K/V.

    A ``[B, C, D]`` cache gives keys ``[B, C+N, D]`` and new keys ``[B, N, D]``; a heads-major
    ``[B, H, C, Dh]`` cache gives keys ``[B, H, C+N, Dh]`` and new keys ``[B, H, N, Dh]``.

    Returns:
        (keys, values, new keys, new values).
    """
    k, v = attn.project_kv(h)
    if past_keys is None:
        return k, v, k, v
    if past_keys.dim() == 4:
        k, v = attn.split_heads(k), attn.split_heads(v)
        return torch.cat([past_keys, k], dim=2), torch.cat([past_values, v], dim=2), k, v
    return torch.cat([past_keys, k], dim=1), torch.cat([past_values, v], dim=1), k, v


class TransformerEncoderLayer(nn.Module):
    """Pre-LN self-attention + ReLU FFN: ``x += SA(LN(x)); x += FFN(LN(x))``."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, past_keys: Tensor | None = None,
                past_values: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            x: ``[B, N, D]`` new rows.
            allowed: bool ``[B or 1, N, C + N]`` over ``cat(past, new)`` keys (``C = 0`` if no past).
            past_keys, past_values: ``[B, C, D]`` cached projected K/V, or None (full pass).
        Returns:
            (``[B, N, D]`` output, new rows' keys ``[B, N, D]``, values ``[B, N, D]``).
        """
        h = self.self_attn_layer_norm(x)
        keys, values, k, v = _self_attention_kv(self.self_attn, h, past_keys, past_values)
        x = x + self.dropout(self.self_attn.attend(h, keys, values, allowed))
        x = x + self.dropout(self.ffn(self.final_layer_norm(x)))
        return x, k, v


class TransformerDecoderLayer(nn.Module):
    """Pre-LN self-attention, cross-attention and ReLU FFN (fairseq decoder layer).

    ``kdim`` is the width of what cross-attention reads (256-d encoder frames for the MT decoder);
    its keys/values are projected once by ``encoder_attn.project_kv`` and cached by the caller.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, kdim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = MultiheadAttention(d_model, num_heads, kdim=kdim)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, self_allowed: Tensor, cross_keys: Tensor, cross_values: Tensor,
                cross_allowed: Tensor, past_keys: Tensor | None = None,
                past_values: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            x: ``[B, N, D]`` new rows.
            self_allowed: bool ``[B or 1, N, C + N]`` (``C = 0`` without a past).
            cross_keys, cross_values: ``[B, S, D]`` projected source K/V.
            cross_allowed: bool ``[B or 1, N, S]``; no row may be all False.
            past_keys, past_values: ``[B, C, D]`` cached self-attention K/V, heads-major
                ``[B, H, C, D/H]``, or None.
        Returns:
            (``[B, N, D]`` output, new rows' self keys and values in the cache's layout).
        """
        h = self.self_attn_layer_norm(x)
        keys, values, k, v = _self_attention_kv(self.self_attn, h, past_keys, past_values)
        x = x + self.dropout(self.self_attn.attend(h, keys, values, self_allowed))
        h = self.encoder_attn_layer_norm(x)
        x = x + self.dropout(self.encoder_attn.attend(h, cross_keys, cross_values, cross_allowed))
        x = x + self.dropout(self.ffn(self.final_layer_norm(x)))
        return x, k, v
