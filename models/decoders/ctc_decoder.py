"""CTC heads on encoder frames: the ASR head and the ST ("NAR-S2TT") head.

- :class:`CTCDecoder` — StreamSpeech's plain ``Linear(256, V)`` head (ASR CTC, and the released
  ST CTC); frame-wise, so it needs no state.
- :class:`CTCDecoderWithTransformerLayer` — the seed's ST CTC head (StreamSpeech
  ``ctc_decoder_with_transformer_layer.py`` with ``--uni-encoder``): ``layers`` causal pre-LN
  transformer layers over the sentence (``left_context`` = the sentence capacity, so within a
  sentence every frame sees all earlier frames), a final LayerNorm and the linear projection.
  Stage ``st_ctc`` runs its :meth:`~CTCDecoderWithTransformerLayer.step`.

Both return log-probabilities computed in fp32 (greedy collapse belongs to the runtime). Time-first
``[T, B, D]`` in ``forward`` keeps StreamSpeech's decoder interface (``encoder_out["encoder_out"][0]``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from echostream.contract import StageContract, st_ctc_states, state_contract
from echostream.models.attention import fifo_append
from echostream.models.state import check_state, zero_state
from echostream.models.transformer_layer import (
    TransformerEncoderLayer,
    band_allowed,
    check_input,
    key_padding_allowed,
    window_allowed,
)


class CTCDecoder(nn.Module):
    """``Linear(d_in, vocab)`` then ``log_softmax`` in fp32, frame-wise.

    ``forward(x [..., d_in]) -> [..., vocab]``: any leading layout (``[T, B, D]`` or ``[B, T, D]``)
    is kept.
    """

    def __init__(self, d_in: int, vocab: int, dropout: float = 0.0):
        super().__init__()
        self.d_in, self.vocab = d_in, vocab
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_in, vocab)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"CTCDecoder: input last dim expected {self.d_in}, got {list(x.shape)}")
        return torch.log_softmax(self.proj(self.dropout(x)).float(), dim=-1)


class CTCDecoderWithTransformerLayer(nn.Module):
    """Causal transformer layers + final LN + CTC projection over encoder frames.

    Frame ``t`` of every layer attends frames ``[t - left_context, t]`` (see
    ``models/transformer_layer.py``), so chunked :meth:`step` calls equal one :meth:`forward`.
    With ``layers == 0`` it is a plain linear head (no final LN, no state), as released
    StreamSpeech.
    """

    def __init__(self, d_model: int, vocab: int, layers: int, heads: int, ffn: int,
                 left_context: int, dropout: float = 0.1):
        super().__init__()
        if layers < 0:
            raise ValueError(f"st_ctc: layers expected >= 0, got {layers}")
        if layers > 0 and left_context < 1:
            raise ValueError(
                f"st_ctc: left_context expected >= 1 with {layers} layer(s) (caches are never "
                f"zero-length), got {left_context}"
            )
        self.d_model, self.vocab = d_model, vocab
        self.num_layers, self.left_context = layers, left_context
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, heads, ffn, dropout) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(d_model) if layers > 0 else None
        self.ctc = CTCDecoder(d_model, vocab, dropout)
        self.contract: StageContract = state_contract("st_ctc",
                                                      st_ctc_states(layers, left_context, d_model))

    @classmethod
    def from_config(cls, cfg) -> "CTCDecoderWithTransformerLayer":
        """Build from an ``EchoStreamConfig`` (encoder width, ``ctc`` section); the layers are
        causal over the whole sentence (``sentence.max_source_frames``), as StreamSpeech's
        ``--uni-encoder``."""
        c = cfg.ctc
        return cls(cfg.encoder.d_model, c.tgt_vocab_size, c.st_layers, c.st_num_heads,
                   c.st_ffn_dim, cfg.sentence.max_source_frames)

    def initial_state(self, batch: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """Zero caches, zero counter (``{}`` for a linear head)."""
        return zero_state(self.contract, batch, device)

    def _head(self, x: Tensor) -> Tensor:
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.ctc(x)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Full pass.

        Args:
            x: ``[T, B, D]`` encoder frames (time first, as ``encoder_out``).
            padding_mask: ``[B, T]`` bool, True = padded frame, or None.
        Returns:
            ``[T, B, V]`` fp32 log-probs (rows of padded frames are don't-care).
        """
        check_input("st_ctc", "x", x, (None, None, self.d_model))
        T, B, _ = x.shape
        if padding_mask is not None:
            check_input("st_ctc", "padding_mask", padding_mask, (B, T), torch.bool)
        h = x.transpose(0, 1)  # [B, T, D]
        if self.num_layers:
            allowed = key_padding_allowed(band_allowed(T, self.left_context, x.device), padding_mask)
            for layer in self.layers:
                h, _, _ = layer(h, allowed)
        return self._head(h).transpose(0, 1)

    def step(self, x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One chunk of ``S`` new frames.

        Args:
            x: ``[B, S, D]`` new encoder frames.
            state: ``keys``/``values`` ``[B, layers, C, D]`` (each layer's projected self-attention
                K/V of the ``C = left_context`` previous frames), ``processed_frames`` ``[B]`` int32;
                ``{}`` when ``layers == 0``.
        Returns:
            (``[B, S, V]`` fp32 log-probs, next state with the same keys).
        """
        check_input("st_ctc", "x", x, (None, None, self.d_model))
        B, S, _ = x.shape
        check_state(self.contract, state, B)
        if not self.num_layers:
            return self.ctc(x), {}
        count = state["processed_frames"]
        allowed = window_allowed(count, self.left_context, S)
        h, next_keys, next_values = x, [], []
        for i, layer in enumerate(self.layers):
            past_k, past_v = state["keys"][:, i], state["values"][:, i]
            h, k, v = layer(h, allowed, past_k, past_v)
            next_keys.append(fifo_append(past_k, k))
            next_values.append(fifo_append(past_v, v))
        next_state = {
            "keys": torch.stack(next_keys, dim=1),
            "values": torch.stack(next_values, dim=1),
            "processed_frames": count + S,
        }
        return self._head(h), next_state
