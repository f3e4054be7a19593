"""The whole EchoStream model: the encoder, the heads and decoders, and one step callable per stage.

``EchoStreamModel(cfg)`` holds the submodules StreamSpeech has (encoder, ASR CTC, ST CTC, MT
decoder, unit decoder, vocoder). Two faces:

- :meth:`EchoStreamModel.forward` — full utterance, StreamSpeech's ``encoder_out`` contract
  (``encoder_out["encoder_out"][0]`` is ``[T, B, D]``) plus both CTC heads' log-probs;
- :meth:`EchoStreamModel.stage_step` — for each stage of ``echostream.contract`` a callable
  ``step(inputs, state) -> (outputs, next_state)`` keyed exactly by the contract's names (``inputs``
  = data + context inputs, ``next_state`` keyed by state names without ``next_``). The exporter wraps
  it into a positional module; the torch backend runs it on numpy; parity compares against it.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from echostream.contract import UNIT_SHORT_STAGE, StageContract, short_target_tokens, stage_contract
from echostream.config import EchoStreamConfig
from echostream.models.decoders.ctc_decoder import CTCDecoder, CTCDecoderWithTransformerLayer
from echostream.models.decoders.transformer_decoder import TransformerMTDecoder
from echostream.models.decoders.unit_decoder import CTCTransformerUnitDecoder
from echostream.models.decoders.vocoder import CodeHiFiGAN

TensorDict = dict[str, Tensor]
StepFn = Callable[[TensorDict, TensorDict], tuple[TensorDict, TensorDict]]


def build_encoder(cfg: EchoStreamConfig) -> nn.Module:
    """The Emformer (``echostream``, ``tiny``) or the chunk Conformer baseline (``streamspeech``)."""
    if cfg.encoder.kind == "emformer":
        from echostream.models.echostream_encoder import EchoStreamEncoder

        return EchoStreamEncoder(cfg.encoder)
    if cfg.encoder.kind == "conformer":
        from echostream.models.conformer_encoder import ChunkConformerEncoder

        return ChunkConformerEncoder(cfg.encoder, cfg.sentence.max_source_frames)
    raise ValueError(f"encoder kind expected 'emformer' or 'conformer', got {cfg.encoder.kind!r}")


class EchoStreamModel(nn.Module):
    """StreamSpeech with a streaming encoder; see the module docstring."""

    def __init__(self, cfg: EchoStreamConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.asr_ctc = CTCDecoder(cfg.encoder.d_model, cfg.ctc.src_vocab_size)
        self.st_ctc = CTCDecoderWithTransformerLayer.from_config(cfg)
        self.mt_decoder = TransformerMTDecoder.from_config(cfg)
        self.unit_decoder = CTCTransformerUnitDecoder.from_config(cfg)
        self.vocoder = CodeHiFiGAN(cfg.vocoder)

    # ---- full utterance ---------------------------------------------------------------------
    def forward(self, features: Tensor, lengths: Tensor) -> dict[str, object]:
        """Encoder + both CTC heads over whole utterances.

        Args:
            features: ``[B, F, 80]`` fbank frames (after global CMVN).
            lengths: ``[B]`` valid fbank frames per utterance.
        Returns:
            the encoder's dict (``encoder_out``: ``[[T, B, D]]``, ``encoder_padding_mask``:
            ``[[B, T]]``, ...) plus ``asr_log_probs`` and ``st_log_probs``, both ``[T, B, V]``.
        """
        out = dict(self.encoder(features, lengths))
        frames = out["encoder_out"][0]
        mask = out["encoder_padding_mask"][0] if out.get("encoder_padding_mask") else None
        out["asr_log_probs"] = self.asr_ctc(frames)
        out["st_log_probs"] = self.st_ctc(frames, mask)
        return out

    # ---- one step per stage -------------------------------------------------------------------
    def contract(self, stage: str) -> StageContract:
        return stage_contract(stage, self.cfg.to_dict())

    def stage_step(self, name: str) -> StepFn:
        """The step callable of stage ``name`` (see the module docstring for its I/O)."""
        steps: dict[str, StepFn] = {
            "encoder": self._encoder_step,
            "st_ctc": self._st_ctc_step,
            "mt_source": self._mt_source_step,
            "mt_decoder": self._mt_decoder_step,
            "unit_decoder": self._unit_decoder_step,
            UNIT_SHORT_STAGE: self._unit_short_step,
            "unit_sentence": self._unit_sentence_step,
            "duration": self._duration_step,
            "vocoder": self._vocoder_step,
        }
        if name not in steps:
            raise ValueError(f"unknown stage {name!r}; expected one of {list(steps)}")
        return steps[name]

    def _encoder_step(self, inputs: TensorDict, state: TensorDict):
        # The ASR CTC head is frame-wise, so it rides along in the encoder graph (one call/segment).
        if self.cfg.encoder.kind == "conformer":  # one chunk; a sentence's last may be partial
            y, next_state = self.encoder.step(inputs["x"], inputs["valid_frames"], state)
        else:
            y, next_state = self.encoder.step(inputs["x"], state)
        return {"y": y, "asr_log_probs": self.asr_ctc(y)}, next_state

    def _st_ctc_step(self, inputs: TensorDict, state: TensorDict):
        y, next_state = self.st_ctc.step(inputs["x"], state)
        return {"y": y}, next_state

    def _mt_source_step(self, inputs: TensorDict, state: TensorDict):
        return {}, self.mt_decoder.source_step(inputs["x"], state)

    def _mt_decoder_step(self, inputs: TensorDict, state: TensorDict):
        context = {k: inputs[k] for k in ("cross_keys", "cross_values", "source_frames")}
        (log_probs, hidden), next_state = self.mt_decoder.step(inputs["x"], context, state,
                                                               inputs["is_pad"])
        return {"y": log_probs, "hidden": hidden}, next_state

    def _unit_sentence_step(self, inputs: TensorDict, state: TensorDict):
        # StreamSpeech's agent: the whole text re-decoded, every row sees every T2U state.
        return {"y": self.unit_decoder(inputs["x"], inputs["lengths"], cross_attention="full")}, {}

    def _unit_decoder_step(self, inputs: TensorDict, state: TensorDict):
        y, next_state = self.unit_decoder.step(inputs["x"], state)
        return {"y": y}, next_state

    def _unit_short_step(self, inputs: TensorDict, state: TensorDict):
        y, next_state = self.unit_decoder.step(inputs["x"], state, short_target_tokens(self.cfg))
        return {"y": y}, next_state

    def _duration_step(self, inputs: TensorDict, state: TensorDict):
        return {"y": self.vocoder.duration_step(inputs["x"])}, {}

    def _vocoder_step(self, inputs: TensorDict, state: TensorDict):
        return {"y": self.vocoder.vocoder_step(inputs["x"])}, {}
