"""Masked multi-head attention and fixed-capacity cache helpers shared by every stateful module.

Rules (DESIGN §4): scores and softmax in fp32 with a finite negative fill (``NEG_FILL``); masks are
built by comparing int32 counters with constant index vectors, never by slicing on data; caches are
right-aligned FIFOs updated with ``cat`` + a constant slice.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

NEG_FILL = -1.0e4  # finite: stays finite in fp16 too; exp(-1e4 + s) == 0 for any realistic score


def constant_index(length: int, device: torch.device | None = None) -> Tensor:
    """``[0, 1, ..., length-1]`` as an int32 tensor built from a Python list (a graph constant,
    not a Range node, when exported)."""
    return torch.tensor(list(range(length)), dtype=torch.int32, device=device)


def right_aligned_valid(count: Tensor, capacity: int) -> Tensor:
    """Validity of the slots of a right-aligned FIFO of ``capacity`` slots.

    Args:
        count: ``[B]`` int32, entries written so far (may exceed ``capacity``).
    Returns:
        ``[B, capacity]`` bool; slot ``j`` holds a valid entry iff ``capacity - 1 - j < count``.
    """
    age = (capacity - 1) - constant_index(capacity, count.device)  # [C]: C-1 ... 0
    return age.unsqueeze(0) < count.to(torch.int32).unsqueeze(1)


def fifo_append(cache: Tensor, new: Tensor, dim: int = 1) -> Tensor:
    """Append ``new`` at the end of ``cache`` along ``dim`` and keep the newest ``cache.size(dim)``
    entries (constant slice)."""
    capacity = cache.shape[dim]
    return torch.cat([cache, new], dim=dim).narrow(dim, new.shape[dim], capacity)


def mask_bias(allowed: Tensor) -> Tensor:
    """Bool mask (True = may attend) -> additive fp32 bias (0 or ``NEG_FILL``)."""
    return (1.0 - allowed.to(torch.float32)) * NEG_FILL


class MultiheadAttention(nn.Module):
    """Multi-head attention with separate projections so keys/values can be cached per layer.

    ``kdim`` lets the MT decoder's cross-attention project 256-d encoder frames to 512-d K/V.
    """

    def __init__(self, d_model: int, num_heads: int, kdim: int | None = None, bias: bool = True):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        kdim = kdim or d_model
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(kdim, d_model, bias=bias)
        self.v_proj = nn.Linear(kdim, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, T, kdim]`` -> keys, values ``[B, T, d_model]`` (what caches store)."""
        return self.k_proj(x), self.v_proj(x)

    def split_heads(self, x: Tensor) -> Tensor:
        """``[B, T, d_model]`` -> heads-major ``[B, H, T, Dh]``."""
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, query: Tensor, keys: Tensor, values: Tensor, allowed: Tensor | None) -> Tensor:
        """Attention of projected-or-raw queries over already projected keys/values.

        Args:
            query: ``[B, Tq, d_model]`` (un-projected; projected here).
            keys, values: ``[B, Tk, d_model]`` (projected), or heads-major ``[B, H, Tk, Dh]``
                (a cache kept in the layout attention reads, so it is never transposed).
            allowed: bool ``[B or 1, Tq, Tk]`` (True = may attend) or None. No row may be all False.
        Returns:
            ``[B, Tq, d_model]`` after the output projection.
        """
        B, Tq, _ = query.shape
        q = self.split_heads(self.q_proj(query))  # [B, H, Tq, Dh]
        k = keys if keys.dim() == 4 else self.split_heads(keys)
        v = values if values.dim() == 4 else self.split_heads(values)
        Dh = self.head_dim
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (Dh ** -0.5)
        if allowed is not None:
            scores = scores + mask_bias(allowed).unsqueeze(1)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, Tq, self.d_model)
        return self.out_proj(out)

    def forward(self, query: Tensor, key_value: Tensor, allowed: Tensor | None = None) -> Tensor:
        k, v = self.project_kv(key_value)
        return self.attend(query, k, v, allowed)
