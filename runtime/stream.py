"""One audio stream as data: everything a stream carries between ``decode`` calls.

sherpa-onnx's ``OnlineStream``: the engine (``Translator``) is stateless and shared; a stream is
the audio front end, every stage state of the sentence in progress, the CTC collapses, the policy
and synthesiser bookkeeping, the sentences already ended, and a compute clock. Nothing in it
calls a stage: the translator's programs read and update these fields.

Create streams with :meth:`Translator.create_stream`.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from echostream.runtime.audio import MODEL_SAMPLE_RATE, StreamingResampler, check_samples
from echostream.runtime.ctc import IncrementalCTC
from echostream.runtime.events import EndOfSentence
from echostream.runtime.features import FeatureStream
from echostream.runtime.policy import PolicyState
from echostream.runtime.stage import StageState
from echostream.runtime.synthesis import SynthesisState

if TYPE_CHECKING:  # the translator imports this module
    from echostream.runtime.translator import Translator


class StageClock:
    """Per-stage calls and seconds of one stream (computation-aware latency, benchmarks).

    A batched call counts in full for every stream in it: that is how long each of them waited.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float, calls: int = 1) -> None:
        self.calls[stage] = self.calls.get(stage, 0) + calls
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def on_call(self, stage: str, batch: int, seconds: float) -> None:
        """The scheduler's hook: a call of ``batch`` rows (0 = a state copy) took ``seconds``."""
        self.add(stage, seconds, calls=1 if batch else 0)

    @property
    def total_ms(self) -> float:
        return 1000.0 * sum(self.seconds.values())

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {s: {"calls": self.calls[s], "seconds": self.seconds[s]} for s in self.seconds}


class Transcript:
    """What the ended sentences said, for the stream's ``EndOfStream``: texts and target ids of
    every sentence, kept compactly (strings and one int array, no object per sentence), so an
    endless stream's memory grows with its text alone (~100 bytes a sentence).
    """

    def __init__(self) -> None:
        self.sentences = 0
        self.asr_texts: list[str] = []
        self.translation_texts: list[str] = []
        self.translation_ids = array("q")
        self.num_samples = 0
        self.last: EndOfSentence | None = None

    def add(self, end: EndOfSentence) -> None:
        self.sentences += 1
        if end.asr_text:
            self.asr_texts.append(end.asr_text)
        if end.translation_text:
            self.translation_texts.append(end.translation_text)
        self.translation_ids.extend(end.translation_ids)
        self.num_samples += end.num_samples
        self.last = end


@dataclass
class Sentence:
    """The sentence in progress: where its audio starts, its stage states and bookkeeping.

    ``frame_base``: absolute fbank frame where the sentence's first segment starts;
    ``encoder_steps``: encoder steps taken (S frames each); ``states``: stage -> state for the
    stages whose state lives for the sentence (the MT decoder's lives in ``policy.mt``).
    """

    frame_base: int
    states: dict[str, StageState]
    asr_ctc: IncrementalCTC
    st_ctc: IncrementalCTC
    unit_ctc: IncrementalCTC
    policy: PolicyState
    synthesis: SynthesisState
    encoder_steps: int = 0
    unit_text_states: int = 0  # text states fed to the unit decoder (it picks the graph)
    num_samples: int = 0  # speech samples of this sentence
    encoder_origin: int | None = None  # where the encoder state began (frames before it: zeros)
    exact: Any = None  # the exact-fidelity bookkeeping (runtime/exact.py AgentBook)
    agent: Any = None  # the exact mode's PyTorch reference agent (backend "torch")


@dataclass
class Stream:
    """All state of one audio stream (see the module docstring)."""

    translator: "Translator"  # the engine that made it (and the only one that may decode it)
    features: FeatureStream
    sentence: Sentence
    clock: StageClock = field(default_factory=StageClock)
    resampler: StreamingResampler | None = None
    input_done: bool = False
    finished: bool = False  # input finished and every output (through EndOfStream) returned
    transcript: Transcript = field(default_factory=Transcript)  # the sentences already ended
    window: np.ndarray | None = None  # the encoder's fbank window, reused every step
    calls: int = 0  # exact fidelity: agent calls made (one per segment of audio)

    # ---- audio input ----------------------------------------------------------------------------

    def accept_waveform(self, sample_rate: int, samples: np.ndarray) -> None:
        """Append mono samples ``[n]`` (float, nominally [-1, 1]) at ``sample_rate`` (any n, any
        rate; resampled to 16 kHz). The rate may not change within a stream. A refused call
        changes nothing."""
        if self.input_done:
            raise ValueError("accept_waveform called after input_finished(); reset() the stream "
                             "to start a new utterance")
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples [n], got shape {list(samples.shape)}")
        if samples.size and not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"expected float samples in [-1, 1], got dtype {samples.dtype}")
        check_samples(samples, int(sample_rate))
        if self.resampler is None:
            self.resampler = StreamingResampler(int(sample_rate), MODEL_SAMPLE_RATE)
        elif self.resampler.in_rate != sample_rate:
            raise ValueError(f"sample_rate changed within the stream: expected "
                             f"{self.resampler.in_rate}, got {sample_rate}")
        self.features.accept_waveform(self.resampler.process(samples))

    def input_finished(self) -> None:
        """No more audio: the next decode flushes every output."""
        if self.input_done:
            return
        if self.resampler is not None:
            self.features.accept_waveform(self.resampler.flush())
        self.features.input_finished()
        self.input_done = True

    def reset(self) -> None:
        """Start a new sentence: every model state, counter and committed token is forgotten.

        Mid-stream (e.g. at a pause a VAD found) the audio not yet consumed by the encoder is kept
        and the next sentence starts at the next unprocessed segment; after ``input_finished`` the
        stream becomes a fresh one, ready for new audio (and its compute clock restarts).
        """
        self.translator.reset(self)

    # ---- views --------------------------------------------------------------------------------

    @property
    def next_segment_frame(self) -> int:
        """Absolute fbank frame where the next unprocessed encoder segment begins."""
        return self.sentence.frame_base + self.sentence.encoder_steps * self.translator.hop

    @property
    def committed_tokens(self) -> list[int]:
        return list(self.sentence.policy.committed)

    @property
    def asr_tokens(self) -> list[int]:
        return list(self.sentence.asr_ctc.tokens)

    @property
    def received_ms(self) -> float:
        """Milliseconds of audio received (at the model rate)."""
        return 1000.0 * self.features.num_samples / self.features.sample_rate

    # Shorthands for the sentence in progress (tests, tools).
    @property
    def states(self) -> dict[str, StageState]:
        return self.sentence.states

    @property
    def policy(self) -> PolicyState:
        return self.sentence.policy

    @property
    def synthesizer(self) -> SynthesisState:
        return self.sentence.synthesis

    @property
    def encoder_steps(self) -> int:
        return self.sentence.encoder_steps

    @property
    def asr_ctc(self) -> IncrementalCTC:
        return self.sentence.asr_ctc

    @property
    def st_ctc(self) -> IncrementalCTC:
        return self.sentence.st_ctc
