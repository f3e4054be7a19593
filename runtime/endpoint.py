"""Endpointing: where a sentence ends in an endless stream, from the ASR CTC output alone.

sherpa-onnx's endpoint rules, on the ASR head's greedy labels (blank = nothing said in that 40 ms
encoder frame), checked after every policy segment:

1. **pause**: the sentence has text and its last ``after_text_ms`` were blank -> the sentence
   ends: its translation is decoded to ``</s>``, its speech flushed, an ``EndOfSentence`` reports
   it, and the next segment starts a new sentence;
2. **silence**: the sentence has no text yet and ``no_text_ms`` were blank -> the sentence
   restarts silently (no event: nothing was said), so a long silence never fills the caches;
3. **capacity**: the sentence capacity (``sentence.max_source_frames`` / ``max_target_tokens``)
   ends it too; that endpoint is the translator's (``EndOfSentence`` says ``*_capacity``).

``silence_floor`` is an energy gate in front of the rules (off by default): an encoder frame whose
audio is silent (every mel bin of its fbank frames below the floor, in raw log-mel before CMVN;
digital silence is log(float eps) = -15.9, speech lies far above) reads as a certain blank to the
ASR CTC collapse, as a trained ASR head would emit there. Trained models hardly need it on clean
audio; the seeded random-weight presets do (their ASR head emits its prior on anything, silence
included, so without the gate they never show a pause).

Whether the encoder state carries across sentences is ``carry_encoder``: off by default, which is
what StreamSpeech was trained for (every training utterance starts from a fresh encoder); on, the
Emformer continues with its memory and left context (the chunk Conformer's cache is the sentence
itself and cannot carry).

Examples:
    >>> rule = EndpointConfig(after_text_ms=800)
    >>> decide(trailing_blank_ms=960, has_text=True, cfg=rule)
    'pause'
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENCODER_FRAME_MS = 40
DIGITAL_SILENCE_LOG_MEL = -15.0  # just above log(float eps) = -15.9: nothing but digital silence
NEG = -1.0e4


@dataclass(frozen=True)
class EndpointConfig:
    """The endpoint rules' thresholds, in milliseconds of blank ASR frames."""

    after_text_ms: float = 1000.0
    no_text_ms: float = 3000.0
    carry_encoder: bool = False
    silence_floor: float | None = None  # raw log-mel; None: no energy gate

    def __post_init__(self) -> None:
        for name in ("after_text_ms", "no_text_ms"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"endpoint {name} expected > 0 ms, got {value}")


def decide(trailing_blank_ms: float, has_text: bool, cfg: EndpointConfig) -> str | None:
    """The rule that fires: "pause" (text, then ``after_text_ms`` of blank), "silence" (no text,
    ``no_text_ms`` of blank) or None."""
    if has_text and trailing_blank_ms >= cfg.after_text_ms:
        return "pause"
    if not has_text and trailing_blank_ms >= cfg.no_text_ms:
        return "silence"
    return None


def silent_rows(window: np.ndarray, lead: int, rows: int, frames_per_row: int, floor: float,
                mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """Which encoder frames of a window are silent: ``[rows]`` bool.

    Args:
        window: ``[W, 80]`` CMVN-normalised fbank window; encoder frame ``u`` reads its frames
            ``lead + frames_per_row * u`` to ``+ frames_per_row``.
        floor: raw log-mel floor; ``mean``/``std``: the CMVN statistics (None: identity).
    """
    frames = window[lead:lead + frames_per_row * rows]
    raw = frames if std is None else frames * std + (0.0 if mean is None else mean)
    return raw.reshape(rows, frames_per_row, -1).max(axis=(1, 2)) < floor


def blank_where(log_probs: np.ndarray, silent: np.ndarray, blank: int) -> np.ndarray:
    """``[U, V]`` CTC log-probs with the ``silent`` rows replaced by a certain blank."""
    if not silent.any():
        return log_probs
    out = np.array(log_probs, copy=True)
    out[silent] = NEG
    out[silent, blank] = 0.0
    return out
