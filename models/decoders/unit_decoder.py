"""Text-to-unit: causal T2U encoder + StreamSpeech's ``CTCTransformerUnitDecoder`` (facts §6).

- T2U encoder (``UniTransformerEncoderNoEmb`` with ``--uni-encoder``): ``t2u_layers`` causal
  pre-LN layers + final LN over the MT decoder's final hidden states (D_text); no embedding, no
  positions.
- Unit decoder: every T2U state repeated ``upsample`` (25) times, plus one constant positional
  vector -> ``num_layers`` pre-LN layers (causal self-attention over upsampled positions,
  cross-attention to T2U states) -> final LN -> ``Linear(D, num_classes)`` -> fp32 log-softmax
  (1000 units + 4 fairseq specials + blank 1004).

Symbols: ``B`` batch, ``N`` text states (``</s>`` + tokens), ``U = upsample``, ``D`` width,
``K`` unit classes, ``Ct`` = ``text_capacity`` (text states a sentence holds before the current
one, the config's ``max_target_tokens``).

The constant positional term (StreamSpeech ``ctc_transformer_unit_decoder.py:176-181``): fairseq's
sinusoidal module is called on a time-major ``[U*N, B]`` tensor as if it were ``[B, T]``, so
positions count along the batch axis. At inference (``B = 1``) every upsampled row gets the same
vector, the sinusoid at position ``padding_idx + 1 = 2``; that is what this module adds, for any
batch (a batched StreamSpeech run would give row ``b`` of the batch position ``b + 2``, an artefact
we do not reproduce). fairseq also zeroes the vector of a row whose first feature is exactly the
padding index 1.0, a measure-zero case we ignore.

Windows (within a sentence every one of them is the unbounded causal module):
- T2U state ``i`` attends T2U states ``[i - Ct, i]``;
- upsampled row ``u`` of text state ``b = u // U`` attends rows ``j <= u`` with
  ``j // U >= b - Ct`` (every row of the ``Ct`` previous text states, causal in its own block);
- cross-attention, ``cross_attention="block_causal"``: the rows of text state ``b`` see T2U states
  ``[b - Ct, b]``, so a text state's units are final once it is fed (one :meth:`step` per
  committed text state); ``"full"``: every row sees all T2U states of the text, as StreamSpeech's
  agent runs it (the whole text is re-decoded at every write: :meth:`forward` with ``lengths``,
  the sentence graph of the ``exact`` runtime mode). There is no incremental step for ``"full"``.

The output projection has no bias: StreamSpeech ties it to the (otherwise unused) unit embedding
table, i.e. ``Linear(weight=embed.weight)``.

Examples:
    >>> dec = CTCTransformerUnitDecoder(d_model=32, t2u_layers=1, layers=2, heads=2, ffn=64,
    ...                                 text_capacity=8).eval()
    >>> text = torch.randn(1, 3, 32)
    >>> full = dec(text)                                      # [1, 75, 1005]
    >>> state = dec.initial_state(1)
    >>> y0, state = dec.step(text[:, 0], state)               # [1, 25, 1005] == full[:, :25]
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from echostream.contract import (
    UNIT_SHORT_STAGE,
    StageContract,
    state_contract,
    unit_decoder_states,
    unit_self_state_names,
)
from echostream.models.attention import constant_index, fifo_append, right_aligned_valid
from echostream.config import UNIT_CROSS_ATTENTION
from echostream.models.decoders.transformer_decoder import SinusoidalPositions
from echostream.models.state import check_state, zero_state
from echostream.models.transformer_layer import (
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    band_allowed,
    check_input,
    key_padding_allowed,
    window_allowed,
)

UNIT_PADDING_IDX = 1  # the unit dictionary's <pad>; StreamSpeech's constant position is pad + 1


def block_window_allowed(length: int, block: int, blocks: int, device=None) -> Tensor:
    """Full-pass unit self-attention mask: row ``u`` may attend ``j <= u`` with
    ``j // block >= u // block - blocks``.

    Returns:
        ``[L, L]`` bool.
    """
    idx = constant_index(length, device)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)
    lag = (idx // block).unsqueeze(1) - (idx // block).unsqueeze(0)
    return causal & (lag <= blocks)


def block_step_allowed(count: Tensor, capacity: int, new: int) -> Tensor:
    """Streaming unit self-attention mask over ``cat(cache, new)``: every valid cache slot (the
    cache holds whole previous blocks), causal inside the new block.

    Args:
        count: ``[B]`` int32 rows written before this step.
        capacity: cache slots (``U * Ct``).
        new: rows in this step (``U``).
    Returns:
        ``[B, new, capacity + new]`` bool.
    """
    causal = torch.tensor([[k <= i for k in range(new)] for i in range(new)], device=count.device)
    cache_ok = right_aligned_valid(count, capacity).unsqueeze(1).expand(-1, new, capacity)
    return torch.cat([cache_ok, causal.unsqueeze(0).expand(count.shape[0], new, new)], dim=-1)


class T2UEncoder(nn.Module):
    """Causal pre-LN transformer encoder (no embedding, no positions) + final LN; window ``context``.

    ``forward(x [B, N, D], lengths [B] | None) -> [B, N, D]``; ``step(x [B, 1, D], keys, values
    [B, L, C, D], count [B]) -> (y [B, 1, D], next_keys, next_values)``.
    """

    def __init__(self, d_model: int, layers: int, heads: int, ffn: int, context: int,
                 dropout: float = 0.1):
        super().__init__()
        self.context = context
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, heads, ffn, dropout) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        allowed = key_padding_allowed(band_allowed(x.shape[1], self.context, x.device), padding_mask)
        for layer in self.layers:
            x, _, _ = layer(x, allowed)
        return self.layer_norm(x)

    def step(self, x: Tensor, keys: Tensor, values: Tensor, count: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """The window is the cache's length (``self.context``, or shorter for a short graph)."""
        allowed = window_allowed(count, keys.shape[2], x.shape[1])
        next_keys, next_values = [], []
        for i, layer in enumerate(self.layers):
            past_k, past_v = keys[:, i], values[:, i]
            x, k, v = layer(x, allowed, past_k, past_v)
            next_keys.append(fifo_append(past_k, k))
            next_values.append(fifo_append(past_v, v))
        return self.layer_norm(x), torch.stack(next_keys, 1), torch.stack(next_values, 1)


class CTCTransformerUnitDecoder(nn.Module):
    """T2U encoder (``self.t2u``) + non-autoregressive CTC unit decoder (see module doc)."""

    def __init__(self, d_model: int = 512, num_classes: int = 1005, t2u_layers: int = 2,
                 layers: int = 6, heads: int = 8, ffn: int = 2048, upsample: int = 25,
                 text_capacity: int = 128, cross_attention: str = "block_causal",
                 dropout: float = 0.1):
        super().__init__()
        for name, value in (("t2u_layers", t2u_layers), ("layers", layers), ("upsample", upsample),
                            ("text_capacity", text_capacity)):
            if value < 1:
                raise ValueError(f"unit_decoder: {name} expected >= 1, got {value}")
        if cross_attention not in UNIT_CROSS_ATTENTION:
            raise ValueError(f"unit_decoder: cross_attention expected one of "
                             f"{list(UNIT_CROSS_ATTENTION)}, got {cross_attention!r}")
        self.d_model, self.num_classes, self.num_layers = d_model, num_classes, layers
        self.upsample, self.text_capacity = upsample, text_capacity
        self.cross_attention = cross_attention
        self.t2u = T2UEncoder(d_model, t2u_layers, heads, ffn, text_capacity, dropout)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, heads, ffn, dropout=dropout) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(d_model)
        self.output_projection = nn.Linear(d_model, num_classes, bias=False)
        positions = SinusoidalPositions(d_model, UNIT_PADDING_IDX)
        zero = torch.zeros(1, dtype=torch.int64)
        self.register_buffer("position", positions(zero, zero)[0], persistent=False)  # [D]
        self.contract: StageContract = state_contract("unit_decoder", unit_decoder_states(
            t2u_layers, layers, text_capacity, upsample, d_model, heads))

    @classmethod
    def from_config(cls, cfg) -> "CTCTransformerUnitDecoder":
        """Build from an ``EchoStreamConfig`` (``unit`` section; its width must be the MT width)."""
        u = cfg.unit
        if u.d_model != cfg.mt.d_model:
            raise ValueError(f"unit_decoder: d_model expected = mt.d_model {cfg.mt.d_model} "
                             f"(T2U reads D_text directly), got {u.d_model}")
        return cls(u.d_model, u.num_classes, u.t2u_layers, u.num_layers, u.num_heads, u.ffn_dim,
                   u.upsample, cfg.sentence.max_target_tokens, u.cross_attention)

    @property
    def unit_capacity(self) -> int:
        """Upsampled rows the self-attention cache holds (every row of ``Ct`` text states)."""
        return self.upsample * self.text_capacity

    def initial_state(self, batch: int, device=None) -> dict[str, Tensor]:
        """Zero caches, ``text_positions`` 0."""
        return zero_state(self.contract, batch, device)

    def _upsampled(self, t2u: Tensor) -> Tensor:
        """``[B, N, D]`` T2U states -> ``[B, U*N, D]`` decoder input (repeat + constant position)."""
        x = torch.repeat_interleave(t2u, self.upsample, dim=1) + self.position
        return self.dropout(x)

    def _output(self, x: Tensor) -> Tensor:
        """``[B, R, D]`` -> fp32 log-probs ``[B, R, num_classes]``."""
        return torch.log_softmax(self.output_projection(self.layer_norm(x)).float(), dim=-1)

    def _cross_allowed(self, N: int, device, mode: str) -> Tensor:
        """``[U*N, N]`` bool: which T2U states each upsampled row sees (before key padding)."""
        if mode == "full":
            return torch.ones(N * self.upsample, N, dtype=torch.bool, device=device)
        text_band = band_allowed(N, self.text_capacity, device)  # [N, N]
        return torch.repeat_interleave(text_band, self.upsample, dim=0)

    def forward(self, text_states: Tensor, lengths: Tensor | None = None,
                cross_attention: str | None = None) -> Tensor:
        """Full pass over whole texts (the reference; with ``lengths`` the sentence graph).

        Args:
            text_states: ``[B, N, D]`` D_text (MT final-LN states of ``[</s>, y1, ...]``).
            lengths: ``[B]`` int valid text states per row (None: all ``N``). A padded text
                state is a key nobody attends (T2U, unit self- and cross-attention, as fairseq);
                its rows are still computed from the valid keys (StreamSpeech's agent decodes
                them: its whole-word final write ends with a pad position).
            cross_attention: override the module's mode for this call (the agent runs "full").
        Returns:
            ``[B, U*N, K]`` fp32 log-probs; rows ``U*i .. U*i+U-1`` belong to text state ``i``.
        """
        check_input("unit_decoder", "text_states", text_states, (None, None, self.d_model))
        mode = cross_attention or self.cross_attention
        if mode not in UNIT_CROSS_ATTENTION:
            raise ValueError(f"unit_decoder: cross_attention expected one of "
                             f"{list(UNIT_CROSS_ATTENTION)}, got {mode!r}")
        B, N, _ = text_states.shape
        padding = None
        if lengths is not None:
            check_input("unit_decoder", "lengths", lengths, (B,), (torch.int32, torch.int64))
            padding = constant_index(N, text_states.device).unsqueeze(0) >= lengths.unsqueeze(1)
        t2u = self.t2u(text_states, padding)  # [B, N, D]
        x = self._upsampled(t2u)  # [B, U*N, D]
        rows = N * self.upsample
        self_allowed = key_padding_allowed(
            block_window_allowed(rows, self.upsample, self.text_capacity, x.device),
            None if padding is None else torch.repeat_interleave(padding, self.upsample, dim=1))
        cross_allowed = self._cross_allowed(N, x.device, mode).unsqueeze(0)  # [1, U*N, N]
        if padding is not None:
            # A padded key is never seen; keep T2U state 0 so no row is fully masked.
            first = constant_index(N, x.device) == 0
            cross_allowed = cross_allowed & (~padding | first).unsqueeze(1)
        for layer in self.layers:
            ck, cv = layer.encoder_attn.project_kv(t2u)
            x, _, _ = layer(x, self_allowed, ck, cv, cross_allowed)
        return self._output(x)

    def step_contract(self, text_capacity: int | None = None) -> StageContract:
        """The state contract of :meth:`step` over ``text_capacity`` text states (default ``Ct``)."""
        if text_capacity is None or text_capacity == self.text_capacity:
            return self.contract
        if not 1 <= text_capacity <= self.text_capacity:
            raise ValueError(f"unit_decoder: text_capacity expected 1..{self.text_capacity}, "
                             f"got {text_capacity}")
        t2u_layers, heads = len(self.t2u.layers), self.layers[0].self_attn.num_heads
        return state_contract(UNIT_SHORT_STAGE, unit_decoder_states(
            t2u_layers, self.num_layers, text_capacity, self.upsample, self.d_model, heads))

    def step(self, text_state: Tensor, state: dict[str, Tensor], text_capacity: int | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """One committed text state per stream -> its ``U`` unit-CTC frames (block-causal only).

        With ``text_capacity`` ``c < Ct`` (the short graph) every window and cache holds ``c``
        text states: while ``text_positions < c`` the step is the full one exactly (the states the
        full caches hold beyond ``c`` are still zeros, masked off), so a sentence moves to the
        full step by padding each cache on the left (``runtime.stage.grow_fifo_state``).

        Args:
            text_state: ``[B, D]`` one D_text vector.
            state: ``t2u_keys``/``t2u_values`` ``[B, t2u_layers, Ct, D]``, ``cross_keys``/
                ``cross_values`` ``[B, layers, Ct, D]`` (previous T2U outputs projected by each
                unit layer's cross-attention), ``unit_keys_<i>``/``unit_values_<i>``
                ``[B, H, U*Ct, D/H]`` per unit layer ``i`` (heads-major), ``text_positions`` ``[B]``
                int32 (text states fed so far).
        Returns:
            (fp32 log-probs ``[B, U, K]``, next state).
        """
        if self.cross_attention != "block_causal":
            raise ValueError("unit_decoder: cross_attention 'full' re-decodes the whole text at "
                             "every write and has no incremental step; use forward(text, lengths)")
        check_input("unit_decoder", "text_state", text_state, (None, self.d_model))
        B = text_state.shape[0]
        check_state(self.step_contract(text_capacity), state, B)
        capacity = text_capacity or self.text_capacity
        count = state["text_positions"]
        t2u, t2u_keys, t2u_values = self.t2u.step(
            text_state.unsqueeze(1), state["t2u_keys"], state["t2u_values"], count)  # [B, 1, D]
        cross_allowed = window_allowed(count, capacity, 1)  # [B, 1, Ct + 1]
        self_allowed = block_step_allowed(count * self.upsample, capacity * self.upsample,
                                          self.upsample)
        x = self.dropout(t2u.expand(B, self.upsample, self.d_model) + self.position)  # [B, U, D]
        cross: dict[str, list[Tensor]] = {"cross_keys": [], "cross_values": []}
        next_state: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            past_ck, past_cv = state["cross_keys"][:, i], state["cross_values"][:, i]
            ck, cv = layer.encoder_attn.project_kv(t2u)  # [B, 1, D]
            keys_name, values_name = unit_self_state_names(i)
            past_k, past_v = state[keys_name], state[values_name]  # [B, H, U*Ct, D/H]
            x, k, v = layer(x, self_allowed, torch.cat([past_ck, ck], 1),
                            torch.cat([past_cv, cv], 1), cross_allowed, past_k, past_v)
            cross["cross_keys"].append(fifo_append(past_ck, ck))
            cross["cross_values"].append(fifo_append(past_cv, cv))
            next_state[keys_name] = fifo_append(past_k, k, dim=2)
            next_state[values_name] = fifo_append(past_v, v, dim=2)
        next_state.update({name: torch.stack(c, dim=1) for name, c in cross.items()})
        next_state.update(t2u_keys=t2u_keys, t2u_values=t2u_values, text_positions=count + 1)
        return self._output(x), next_state
