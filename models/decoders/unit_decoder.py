"""Text-to-unit: causal T2U encoder + StreamSpeech's ``CTCTransformerUnitDecoder`` (facts §6).

- T2U encoder (``UniTransformerEncoderNoEmb``): ``t2u_layers`` causal pre-LN layers + final LN over
  the MT decoder's final hidden states (D_text); no embedding, no positions.
- Unit decoder: every T2U state repeated ``upsample`` (25) times -> ``num_layers`` pre-LN layers
  (causal self-attention over upsampled positions, cross-attention to T2U states) -> final LN ->
  ``Linear(D, num_classes)`` -> fp32 log-softmax (1000 units + 4 fairseq specials + blank 1004).

Windows (``models/transformer_layer.py``): T2U state ``i`` attends T2U states ``[i - Ct, i]``;
upsampled position ``u`` attends ``[u - Cu, u]``; the 25 rows of text state ``i`` cross-attend T2U
states ``[i - Ct, i]`` (block-causal: a text state's units never wait for later text). ``Ct`` =
``text_context``, ``Cu`` = ``unit_context``.

No temporal positional encoding. StreamSpeech applies its sinusoidal position module to a
time-major ``[T, B]`` tensor as if it were ``[B, T]``, so positions vary along the batch axis and
every time step of an utterance gets the same vector: effectively no temporal position, order comes
only from the causal self-attention. We add nothing; importing released weights would have to
fold in that constant (batch-1) vector, which this reference does not do.

The output projection has no bias: StreamSpeech ties it to the (otherwise unused) unit embedding
table, i.e. ``Linear(weight=embed.weight)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from echostream.contract import StageContract, unit_decoder_contract
from echostream.models.attention import fifo_append
from echostream.models.state import check_state, zero_state
from echostream.models.transformer_layer import (
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    band_allowed,
    check_input,
    window_allowed,
)


class T2UEncoder(nn.Module):
    """Causal pre-LN transformer encoder (no embedding, no positions) + final LN; window ``context``.

    ``forward(x [B, N, D]) -> [B, N, D]``; ``step(x [B, 1, D], keys, values [B, L, C, D], count [B])
    -> (y [B, 1, D], next_keys, next_values)``.
    """

    def __init__(self, d_model: int, layers: int, heads: int, ffn: int, context: int,
                 dropout: float = 0.1):
        super().__init__()
        self.context = context
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, heads, ffn, dropout) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        allowed = band_allowed(x.shape[1], self.context, x.device).unsqueeze(0)
        for layer in self.layers:
            x, _, _ = layer(x, allowed)
        return self.layer_norm(x)

    def step(self, x: Tensor, keys: Tensor, values: Tensor, count: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        allowed = window_allowed(count, self.context, x.shape[1])
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
                 text_context: int = 64, unit_context: int = 400, dropout: float = 0.1):
        super().__init__()
        for name, value in (("t2u_layers", t2u_layers), ("layers", layers), ("upsample", upsample),
                            ("text_context", text_context), ("unit_context", unit_context)):
            if value < 1:
                raise ValueError(f"unit_decoder: {name} expected >= 1, got {value}")
        self.d_model, self.num_classes, self.num_layers = d_model, num_classes, layers
        self.upsample, self.text_context, self.unit_context = upsample, text_context, unit_context
        self.t2u = T2UEncoder(d_model, t2u_layers, heads, ffn, text_context, dropout)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, heads, ffn, dropout=dropout) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(d_model)
        self.output_projection = nn.Linear(d_model, num_classes, bias=False)
        self.contract: StageContract = unit_decoder_contract({
            "mt": {"d_model": d_model},
            "unit": {"t2u_layers": t2u_layers, "num_layers": layers, "text_context": text_context,
                     "unit_context": unit_context, "d_model": d_model, "upsample": upsample,
                     "num_classes": num_classes},
        })

    @classmethod
    def from_config(cls, cfg) -> "CTCTransformerUnitDecoder":
        """Build from an ``EchoStreamConfig`` (``unit`` section; its width must be the MT width)."""
        u = cfg.unit
        if u.d_model != cfg.mt.d_model:
            raise ValueError(f"unit_decoder: d_model expected = mt.d_model {cfg.mt.d_model} "
                             f"(T2U reads D_text directly), got {u.d_model}")
        return cls(u.d_model, u.num_classes, u.t2u_layers, u.num_layers, u.num_heads, u.ffn_dim,
                   u.upsample, u.text_context, u.unit_context)

    def initial_state(self, batch: int, device=None) -> dict[str, Tensor]:
        """Zero caches, ``text_positions`` 0."""
        return zero_state(self.contract, batch, device)

    def _output(self, x: Tensor) -> Tensor:
        """``[B, U, D]`` -> fp32 log-probs ``[B, U, num_classes]``."""
        return torch.log_softmax(self.output_projection(self.layer_norm(x)).float(), dim=-1)

    def forward(self, text_states: Tensor) -> Tensor:
        """Full pass.

        Args:
            text_states: ``[B, N, D]`` D_text (MT final-LN states of ``[</s>, y1, ...]``).
        Returns:
            ``[B, upsample * N, num_classes]`` fp32 log-probs; rows ``25i .. 25i+24`` belong to
            text state ``i``.
        """
        check_input("unit_decoder", "text_states", text_states, (None, None, self.d_model))
        N = text_states.shape[1]
        t2u = self.t2u(text_states)  # [B, N, D]
        x = self.dropout(torch.repeat_interleave(t2u, self.upsample, dim=1))  # [B, 25N, D]
        self_allowed = band_allowed(N * self.upsample, self.unit_context, x.device).unsqueeze(0)
        # Row u belongs to text state u // upsample and sees T2U states [i - Ct, i].
        text_band = band_allowed(N, self.text_context, x.device)  # [N, N]
        cross_allowed = torch.repeat_interleave(text_band, self.upsample, dim=0).unsqueeze(0)
        for layer in self.layers:
            ck, cv = layer.encoder_attn.project_kv(t2u)
            x, _, _ = layer(x, self_allowed, ck, cv, cross_allowed)
        return self._output(x)

    def step(self, text_state: Tensor, state: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """One committed text state per stream -> its ``upsample`` unit-CTC frames.

        Args:
            text_state: ``[B, D]`` one D_text vector.
            state: ``t2u_keys``/``t2u_values`` ``[B, t2u_layers, Ct, D]``, ``cross_keys``/
                ``cross_values`` ``[B, layers, Ct, D]`` (previous T2U outputs projected by each
                unit layer's cross-attention), ``unit_keys``/``unit_values`` ``[B, layers, Cu, D]``,
                ``text_positions`` ``[B]`` int32 (text states fed so far).
        Returns:
            (fp32 log-probs ``[B, upsample, num_classes]``, next state).
        """
        check_input("unit_decoder", "text_state", text_state, (None, self.d_model))
        B = text_state.shape[0]
        check_state(self.contract, state, B)
        count = state["text_positions"]
        t2u, t2u_keys, t2u_values = self.t2u.step(
            text_state.unsqueeze(1), state["t2u_keys"], state["t2u_values"], count)  # [B, 1, D]
        cross_allowed = window_allowed(count, self.text_context, 1)  # [B, 1, Ct + 1]
        self_allowed = window_allowed(count * self.upsample, self.unit_context, self.upsample)
        x = self.dropout(t2u.expand(B, self.upsample, self.d_model))  # [B, 25, D]
        caches: dict[str, list[Tensor]] = {k: [] for k in
                                           ("cross_keys", "cross_values", "unit_keys", "unit_values")}
        for i, layer in enumerate(self.layers):
            past_ck, past_cv = state["cross_keys"][:, i], state["cross_values"][:, i]
            ck, cv = layer.encoder_attn.project_kv(t2u)  # [B, 1, D]
            past_k, past_v = state["unit_keys"][:, i], state["unit_values"][:, i]
            x, k, v = layer(x, self_allowed, torch.cat([past_ck, ck], 1),
                            torch.cat([past_cv, cv], 1), cross_allowed, past_k, past_v)
            caches["cross_keys"].append(fifo_append(past_ck, ck))
            caches["cross_values"].append(fifo_append(past_cv, cv))
            caches["unit_keys"].append(fifo_append(past_k, k))
            caches["unit_values"].append(fifo_append(past_v, v))
        next_state = {name: torch.stack(c, dim=1) for name, c in caches.items()}
        next_state.update(t2u_keys=t2u_keys, t2u_values=t2u_values, text_positions=count + 1)
        return self._output(x), next_state
