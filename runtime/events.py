"""What ``Translator.decode`` returns: partial ASR text, committed translation, translated speech.

Every event carries two clocks, both in milliseconds:
- ``source_ms``: how much source audio had to be received before the event could be produced
  (segment end plus the encoder's right-context look-ahead; the whole input for the final flush).
  This is the non-computation-aware delay of SimulEval-style latency metrics.
- ``compute_ms``: the stream's cumulative stage compute time when the event was produced; adding
  it to ``source_ms`` gives a computation-aware delay.

Events are plain dataclasses; ``to_json()`` gives a dict of JSON types (``SpeechChunk`` reports its
sample count and duration, not the samples).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class _TextEvent:
    """Text with the token ids it decodes, stamped with the source time of its emission.

    ``replaces``: how many tokens of the text reported before this event it takes back first
    (always 0 in the ``incremental`` fidelity mode, where nothing is retracted; the ``exact`` mode
    reports StreamSpeech's agent, whose hypotheses can shrink: the ASR over a chunk still in
    progress, the whole-word cut of the translation)."""

    text: str
    token_ids: tuple[int, ...]
    source_ms: float
    compute_ms: float = field(default=0.0, compare=False)  # wall-clock: not part of equality
    replaces: int = 0

    kind = "text"

    def to_json(self) -> dict:
        return {"type": self.kind, "text": self.text, "token_ids": list(self.token_ids),
                "replaces": self.replaces, "source_ms": round(float(self.source_ms), 3),
                "compute_ms": round(float(self.compute_ms), 3)}


@dataclass(frozen=True)
class AsrText(_TextEvent):
    """Newly recognised source tokens (streaming ASR from the ASR CTC head)."""

    kind = "asr"


@dataclass(frozen=True)
class TranslationText(_TextEvent):
    """Newly committed target tokens (never retracted)."""

    kind = "translation"


@dataclass(frozen=True, eq=False)
class SpeechChunk:
    """Translated speech for newly committed text.

    ``samples`` is float32 ``[n]`` at ``sample_rate``; ``unit_ids`` are the discrete units (0-999)
    decoded for this chunk (the synthesiser may hold back a few units' samples until later chunks
    or the end-of-stream flush, so samples and units need not line up one to one).
    """

    samples: np.ndarray
    sample_rate: int
    source_ms: float
    unit_ids: tuple[int, ...] = ()
    compute_ms: float = field(default=0.0, compare=False)  # wall-clock: not part of equality

    kind = "speech"

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.samples) / self.sample_rate

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpeechChunk):
            return NotImplemented
        return (self.sample_rate == other.sample_rate and self.unit_ids == other.unit_ids
                and self.source_ms == other.source_ms
                and np.array_equal(self.samples, other.samples))

    def to_json(self) -> dict:
        return {"type": self.kind, "num_samples": int(len(self.samples)),
                "sample_rate": int(self.sample_rate),
                "duration_ms": round(self.duration_ms, 3), "unit_ids": list(self.unit_ids),
                "source_ms": round(float(self.source_ms), 3),
                "compute_ms": round(float(self.compute_ms), 3)}


SENTENCE_END_REASONS = ("pause", "source_capacity", "target_capacity", "end_of_input")


@dataclass(frozen=True)
class EndOfSentence:
    """A sentence ended: its translation was decoded to ``</s>`` and its speech flushed; the
    decoder states restart with the next segment.

    ``reason``: ``"pause"`` (the endpoint rule: text, then a pause), ``"source_capacity"`` (the
    next segment would not fit the sentence's ``max_source_frames``), ``"target_capacity"``
    (``max_target_tokens`` tokens committed) or ``"end_of_input"``. ``start_ms`` is where the
    sentence's audio began; the texts, ids and ``num_samples`` are the sentence's own.
    """

    reason: str
    source_ms: float
    compute_ms: float = field(default=0.0, compare=False)  # wall-clock: not part of equality
    start_ms: float = 0.0
    asr_text: str = ""
    translation_text: str = ""
    translation_ids: tuple[int, ...] = field(default_factory=tuple)
    num_samples: int = 0

    kind = "end_of_sentence"

    @property
    def capacity(self) -> bool:
        """The sentence was cut because a stage's capacity was reached."""
        return self.reason.endswith("_capacity")

    def to_json(self) -> dict:
        return {"type": self.kind, "reason": self.reason, "capacity": self.capacity,
                "start_ms": round(float(self.start_ms), 3),
                "source_ms": round(float(self.source_ms), 3),
                "compute_ms": round(float(self.compute_ms), 3), "asr_text": self.asr_text,
                "translation_text": self.translation_text,
                "translation_ids": list(self.translation_ids), "num_samples": self.num_samples}


@dataclass(frozen=True)
class EndOfStream:
    """The stream's input was finished and every output has been produced.

    ``asr_text`` / ``translation_text`` are the full texts of the stream (its sentences joined by
    spaces), ``translation_ids`` every committed token, ``num_samples`` the total speech samples.
    """

    source_ms: float
    compute_ms: float = field(default=0.0, compare=False)  # wall-clock: not part of equality
    asr_text: str = ""
    translation_text: str = ""
    translation_ids: tuple[int, ...] = field(default_factory=tuple)
    num_samples: int = 0

    kind = "end"

    def to_json(self) -> dict:
        return {"type": self.kind, "source_ms": round(float(self.source_ms), 3),
                "compute_ms": round(float(self.compute_ms), 3), "asr_text": self.asr_text,
                "translation_text": self.translation_text,
                "translation_ids": list(self.translation_ids), "num_samples": self.num_samples}


Event = AsrText | TranslationText | SpeechChunk | EndOfSentence | EndOfStream
