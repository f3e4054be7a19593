"""The autoregressive MT decoder (StreamSpeech's "simultaneous text decoder", fairseq
``TransformerDecoder``): 4 pre-LN layers, d 512, 8 heads, FFN 2048, tied input/output embedding,
embeddings scaled by sqrt(d) plus fairseq sinusoidal positions, cross-attention from 256-d encoder
frames (K/V projected 256 -> 512).

Two stages run it with fixed-capacity caches:
- ``mt_source`` (:meth:`TransformerMTDecoder.source_step`): new encoder frames -> every layer's
  cross-attention K/V, appended to a right-aligned FIFO of ``max_source_frames`` slots;
- ``mt_decoder`` (:meth:`TransformerMTDecoder.step`): one token -> next-token log-probs and the
  final hidden state (D_text, the T2U input), self-attention over the previous
  ``max_target_tokens`` tokens.

:meth:`TransformerMTDecoder.forward` is the teacher-forced reference with the same windows: token
``t`` attends tokens ``[t - max_target_tokens, t]`` and source frames
``[L_t - max_source_frames, L_t)`` where ``L_t`` is the number of frames it may see.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from echostream.contract import StageContract, cross_cache_states, mt_self_states, state_contract
from echostream.models.attention import fifo_append, right_aligned_valid
from echostream.models.state import check_state, zero_state
from echostream.models.transformer_layer import (
    TransformerDecoderLayer,
    band_allowed,
    check_input,
    key_padding_allowed,
    window_allowed,
)

_TOKEN_DTYPES = (torch.int32, torch.int64)


class SinusoidalPositions(nn.Module):
    """fairseq ``SinusoidalPositionalEmbedding`` computed from positions with float math.

    ``pos -> cat(sin(pos * w), cos(pos * w))`` with ``w_i = 10000^(-i / (D/2 - 1))``. A token at
    0-based index ``t`` has fairseq position ``t + padding_idx + 1`` (``make_positions`` on an
    unpadded or right-padded sequence); a padding token gets the zero vector.
    """

    def __init__(self, d_model: int, padding_idx: int):
        super().__init__()
        if d_model % 2 or d_model < 4:
            raise ValueError(f"sinusoidal positions: d_model expected even and >= 4, got {d_model}")
        half = d_model // 2
        step = math.log(10000.0) / (half - 1)
        inv_freq = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.padding_idx = padding_idx

    def forward(self, index: Tensor, tokens: Tensor) -> Tensor:
        """
        Args:
            index: ``[...]`` int, 0-based token index in the target sequence.
            tokens: ``[...]`` int, the tokens at those indices (pad -> zero vector).
        Returns:
            ``[..., D]`` fp32.
        """
        pos = (index + (self.padding_idx + 1)).to(torch.float32).unsqueeze(-1)
        angles = pos * self.inv_freq  # [..., D/2]
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        return emb * (tokens != self.padding_idx).to(torch.float32).unsqueeze(-1)


class TransformerMTDecoder(nn.Module):
    """Pre-LN transformer decoder with tied embeddings and fixed-capacity caches (see module doc)."""

    def __init__(self, vocab: int, d_model: int = 512, layers: int = 4, heads: int = 8,
                 ffn: int = 2048, encoder_dim: int = 256, max_target_tokens: int = 128,
                 max_source_frames: int = 750, padding_idx: int = 1, dropout: float = 0.3):
        super().__init__()
        for name, value in (("layers", layers), ("max_target_tokens", max_target_tokens),
                            ("max_source_frames", max_source_frames)):
            if value < 1:
                raise ValueError(f"mt_decoder: {name} expected >= 1, got {value}")
        self.vocab, self.d_model, self.num_layers = vocab, d_model, layers
        self.encoder_dim, self.padding_idx = encoder_dim, padding_idx
        self.max_target_tokens, self.max_source_frames = max_target_tokens, max_source_frames
        self.embed_scale = math.sqrt(d_model)
        self.embed_tokens = nn.Embedding(vocab, d_model, padding_idx=padding_idx)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=d_model ** -0.5)  # fairseq init
        with torch.no_grad():
            self.embed_tokens.weight[padding_idx].zero_()
        self.embed_positions = SinusoidalPositions(d_model, padding_idx)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, heads, ffn, kdim=encoder_dim, dropout=dropout)
            for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(d_model)
        self.source_contract: StageContract = state_contract(
            "mt_source", cross_cache_states(layers, max_source_frames, d_model))
        self.contract: StageContract = state_contract(
            "mt_decoder", mt_self_states(layers, max_target_tokens, d_model))

    @classmethod
    def from_config(cls, cfg) -> "TransformerMTDecoder":
        """Build from an ``EchoStreamConfig`` (``mt`` section, target vocab, encoder width)."""
        m, sentence = cfg.mt, cfg.sentence
        return cls(cfg.ctc.tgt_vocab_size, m.d_model, m.num_layers, m.num_heads, m.ffn_dim,
                   cfg.encoder.d_model, sentence.max_target_tokens, sentence.max_source_frames,
                   m.pad)

    # ---- states ---------------------------------------------------------------------------------
    def initial_source_state(self, batch: int, device=None) -> dict[str, Tensor]:
        """``mt_source`` zero state: empty cross K/V FIFOs, ``source_frames`` 0."""
        return zero_state(self.source_contract, batch, device)

    def initial_state(self, batch: int, device=None) -> dict[str, Tensor]:
        """``mt_decoder`` zero state: empty self K/V caches, ``target_positions`` 0."""
        return zero_state(self.contract, batch, device)

    # ---- shared pieces --------------------------------------------------------------------------
    def _embed(self, tokens: Tensor, index: Tensor) -> Tensor:
        """``[B, T]`` tokens at ``[B or 1, T]`` indices -> ``[B, T, D]`` decoder input."""
        x = self.embed_scale * self.embed_tokens(tokens) + self.embed_positions(index, tokens)
        return self.dropout(x)

    def _output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, T, D]`` last-layer rows -> (fp32 log-probs ``[B, T, V]``, hidden ``[B, T, D]``)."""
        hidden = self.layer_norm(x)
        logits = torch.matmul(hidden, self.embed_tokens.weight.t())  # tied output projection
        return torch.log_softmax(logits.float(), dim=-1), hidden

    # ---- full pass ------------------------------------------------------------------------------
    def forward(self, prev_tokens: Tensor, encoder_out: Tensor,
                encoder_padding_mask: Tensor | None = None,
                source_lengths_per_token: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass.

        Args:
            prev_tokens: ``[B, T]`` int, ``[</s>, y1, ...]`` (right-padded with pad if at all; a
                pad token is a key no row attends, its own row included, as fairseq).
            encoder_out: ``[T_src, B, E]`` encoder frames (time first).
            encoder_padding_mask: ``[B, T_src]`` bool, True = padded frame, or None.
            source_lengths_per_token: ``[B, T]`` int, frames token ``t`` may see (``>= 1``), or None
                for all unpadded frames. Streaming appends source between tokens; this reproduces it.
        Returns:
            (fp32 log-probs ``[B, T, V]``, final-LN hidden ``[B, T, D]``).
        """
        check_input("mt_decoder", "prev_tokens", prev_tokens, (None, None), _TOKEN_DTYPES)
        B, T = prev_tokens.shape
        check_input("mt_decoder", "encoder_out", encoder_out, (None, B, self.encoder_dim))
        T_src = encoder_out.shape[0]
        lengths = self._source_lengths(B, T, T_src, encoder_padding_mask, source_lengths_per_token,
                                       encoder_out.device)
        frame = torch.arange(T_src, device=encoder_out.device)
        cross_allowed = (frame < lengths.unsqueeze(-1)) & (
            frame >= lengths.unsqueeze(-1) - self.max_source_frames)  # [B, T, T_src]
        # Pad tokens (fairseq pads the agent's whole-word final input) are keys nobody attends.
        self_allowed = key_padding_allowed(band_allowed(T, self.max_target_tokens, prev_tokens.device),
                                           prev_tokens == self.padding_idx)
        index = torch.arange(T, device=prev_tokens.device).unsqueeze(0)
        x = self._embed(prev_tokens, index)
        source = encoder_out.transpose(0, 1)  # [B, T_src, E]
        for layer in self.layers:
            ck, cv = layer.encoder_attn.project_kv(source)
            x, _, _ = layer(x, self_allowed, ck, cv, cross_allowed)
        return self._output(x)

    def _source_lengths(self, B: int, T: int, T_src: int, padding_mask: Tensor | None,
                        per_token: Tensor | None, device) -> Tensor:
        """``[B, T]`` visible source frames per token (from the padding mask if not given)."""
        if padding_mask is not None:
            check_input("mt_decoder", "encoder_padding_mask", padding_mask, (B, T_src), torch.bool)
            total = (~padding_mask).sum(dim=1)
        else:
            total = torch.full((B,), T_src, device=device)
        if per_token is None:
            lengths = total.unsqueeze(1).expand(B, T)
        else:
            check_input("mt_decoder", "source_lengths_per_token", per_token, (B, T), _TOKEN_DTYPES)
            if bool((per_token > total.unsqueeze(1)).any()):
                raise ValueError("mt_decoder: source_lengths_per_token expected <= the unpadded "
                                 f"source length {total.tolist()}, got {per_token.tolist()}")
            lengths = per_token
        if bool((lengths < 1).any()):
            raise ValueError(f"mt_decoder: every token must see >= 1 source frame, got "
                             f"lengths {lengths.tolist()}")
        return lengths

    # ---- streaming ------------------------------------------------------------------------------
    def source_step(self, x: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage ``mt_source``: append ``S`` new encoder frames to every layer's cross K/V.

        Args:
            x: ``[B, S, E]`` new encoder frames.
            state: ``cross_keys``/``cross_values`` ``[B, layers, F, D]`` (right-aligned FIFO,
                ``F = max_source_frames``), ``source_frames`` ``[B]`` int32.
        Returns:
            the next state (same keys; ``source_frames`` += S).
        """
        check_input("mt_source", "x", x, (None, None, self.encoder_dim))
        check_state(self.source_contract, state, x.shape[0])
        next_keys, next_values = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.encoder_attn.project_kv(x)
            next_keys.append(fifo_append(state["cross_keys"][:, i], k))
            next_values.append(fifo_append(state["cross_values"][:, i], v))
        return {
            "cross_keys": torch.stack(next_keys, dim=1),
            "cross_values": torch.stack(next_values, dim=1),
            "source_frames": state["source_frames"] + x.shape[1],
        }

    def _cross_allowed(self, source_frames: Tensor) -> Tensor:
        """``[B]`` int32 -> bool ``[B, 1, F]`` over the cross cache's valid slots.

        The newest slot is always allowed so no row is fully masked (DESIGN §4): with
        ``source_frames >= 1`` it is valid anyway; with 0 (no source yet, which the runtime never
        decodes) it holds the zero state, a defined but meaningless input.
        """
        F = self.max_source_frames
        newest = torch.tensor([j == F - 1 for j in range(F)], device=source_frames.device)
        return (right_aligned_valid(source_frames, F) | newest).unsqueeze(1)

    def step(self, tokens: Tensor, context: dict[str, Tensor], state: dict[str, Tensor],
             is_pad: Tensor | None = None) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        """Stage ``mt_decoder``: one token per stream.

        Args:
            tokens: ``[B]`` int32, the previous token (``</s>`` first).
            is_pad: ``[B]`` int32, 1 where this position is padding (fairseq: a pad is a key no row
                attends, its own row included; StreamSpeech's agent ends its whole-word final MT
                input with one); None = 0.
            context: ``mt_source``'s state (``cross_keys``, ``cross_values``, ``source_frames``);
                decode a stream only once it has ``source_frames >= 1``.
            state: ``self_keys``/``self_values`` ``[B, layers, C, D]`` (``C = max_target_tokens``),
                ``target_positions`` ``[B]`` int32 (tokens fed so far).
        Returns:
            ((fp32 log-probs ``[B, V]``, final-LN hidden ``[B, D]``), next state).
        """
        check_input("mt_decoder", "tokens", tokens, (None,), torch.int32)
        B = tokens.shape[0]
        check_state(self.source_contract, context, B)
        check_state(self.contract, state, B)
        count = state["target_positions"]
        x = self._embed(tokens.unsqueeze(1), count.unsqueeze(1))  # [B, 1, D]
        self_allowed = window_allowed(count, self.max_target_tokens, 1)  # [B, 1, C+1]
        if is_pad is not None:  # the newest key is the position itself
            check_input("mt_decoder", "is_pad", is_pad, (B,), torch.int32)
            # A pad still sees itself when nothing else is there (no row is ever fully masked).
            own = ((is_pad == 0) | (count == 0)).view(B, 1, 1)
            self_allowed = torch.cat([self_allowed[..., :-1], self_allowed[..., -1:] & own], -1)
        cross_allowed = self._cross_allowed(context["source_frames"])  # [B, 1, F]
        next_keys, next_values = [], []
        for i, layer in enumerate(self.layers):
            past_k, past_v = state["self_keys"][:, i], state["self_values"][:, i]
            x, k, v = layer(x, self_allowed, context["cross_keys"][:, i],
                            context["cross_values"][:, i], cross_allowed, past_k, past_v)
            next_keys.append(fifo_append(past_k, k))
            next_values.append(fifo_append(past_v, v))
        log_probs, hidden = self._output(x)
        next_state = {
            "self_keys": torch.stack(next_keys, dim=1),
            "self_values": torch.stack(next_values, dim=1),
            "target_positions": count + 1,
        }
        return (log_probs[:, 0], hidden[:, 0]), next_state
