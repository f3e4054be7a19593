"""The simultaneous translator: audio in, ASR text, translation and speech out, segment by segment.

sherpa-onnx's shape (DESIGN §6): a stateless :class:`Translator` (stage graphs, config,
vocabularies) and a :class:`Stream` per audio stream holding every piece of state::

    translator = Translator.from_artifacts("engines/tiny", backend="onnxruntime", segment_ms=320)
    stream = translator.create_stream()
    stream.accept_waveform(48000, samples)          # any rate, any chunk size
    for event in translator.decode(stream): ...     # AsrText / TranslationText / SpeechChunk
    stream.input_finished()
    events = translator.decode(stream)              # ... then EndOfStream

One policy step per segment of ``segment_ms`` (a multiple of the exported encoder segment of S
frames x 40 ms, so a segment is k encoder steps). Per encoder step: the encoder reads a window of
4(S+R)+3 fbank frames (advancing by 4S) -> S frames ``y`` + ASR log-probs; ``st_ctc`` and
``mt_source`` consume ``y``; the ASR and ST CTC collapses count tokens. Per segment: the
StreamSpeech policy (:mod:`echostream.runtime.policy`) decides READ or WRITE; each newly committed
text state goes through ``unit_decoder`` (25 unit-CTC frames), the incremental unit collapse and
the streaming synthesiser.

At end of input the fbank tail is zero-padded (in normalised feature space, i.e. the CMVN mean) so
the last partial segment and its right context can run; as in the full-utterance pass, the last R
encoder frames of the real audio are only right context, and CTC outputs past them are ignored; the
final decode runs to ``</s>`` and the synthesiser is flushed. Complete segments equal the full pass
exactly; a partial last segment cannot (the fixed-shape step sees padding where the full pass sees a
shorter segment, and ``mt_source`` appends all S frames of it).

Streams never share state, so interleaving several streams through one translator gives each
exactly what it would get alone.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from echostream.contract import (ENCODER_WINDOW_LEAD, STAGE_NAMES, encoder_hop_frames,
                                 encoder_window_frames, sentence_source_frames,
                                 sentence_target_tokens)
from echostream.errors import ArtifactError, EchoStreamError
from echostream.runtime.audio import MODEL_SAMPLE_RATE, StreamingResampler, check_samples
from echostream.runtime.ctc import IncrementalCTC, text_ctc, unit_ctc
from echostream.runtime.events import (AsrText, EndOfSentence, EndOfStream, Event, SpeechChunk,
                                       TranslationText)
from echostream.runtime.features import FeatureStream
from echostream.runtime.policy import (CtcCounts, IncrementalMTDecoder, PolicyConfig, PolicyOutcome,
                                       SimultaneousPolicy)
from echostream.runtime.stage import Stage, StageState
from echostream.runtime.synthesis import StreamingSynthesizer
from echostream.runtime.vocab import Vocabulary

ENCODER_FRAME_MS = 40  # one encoder frame = 4 fbank frames of 10 ms


class SegmentSizeError(EchoStreamError, ValueError):
    """``segment_ms`` is not a whole number of exported encoder segments."""


# ---- compute-time accounting ------------------------------------------------------------------


class StageClock:
    """Per-stage calls and seconds of one stream (computation-aware latency, benchmarks)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float, calls: int = 1) -> None:
        self.calls[stage] = self.calls.get(stage, 0) + calls
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @property
    def total_ms(self) -> float:
        return 1000.0 * sum(self.seconds.values())

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {s: {"calls": self.calls[s], "seconds": self.seconds[s]} for s in self.seconds}


class TimedStage:
    """A stage seen through one stream's :class:`StageClock` (state copies count as its time)."""

    def __init__(self, stage: Stage, clock: StageClock):
        self.stage, self.clock = stage, clock
        self.contract = stage.contract
        self.name = stage.name

    def initial_state(self, batch: int = 1) -> StageState:
        return self.stage.initial_state(batch)

    def run(self, inputs, state=None, context=None):
        start = time.perf_counter()
        try:
            return self.stage.run(inputs, state, context)
        finally:
            self.clock.add(self.name, time.perf_counter() - start)

    def copy_state(self, state: StageState) -> StageState:
        start = time.perf_counter()
        try:
            return self.stage.copy_state(state)
        finally:
            self.clock.add(self.name, time.perf_counter() - start, calls=0)


# ---- text helpers ------------------------------------------------------------------------------


TEXT_CONTEXT = 8  # tokens of left context that decide spacing (keeps long streams O(1) per event)


def incremental_text(vocab: Vocabulary, before: Sequence[int], new: Sequence[int]) -> str:
    """Text that ``new`` adds after ``before`` (a leading space when it starts a word), so that
    the texts of successive events concatenate to the decoded whole."""
    context = list(before[-TEXT_CONTEXT:])
    full, head = vocab.decode(context + list(new)), vocab.decode(context)
    return full[len(head):] if full.startswith(head) else vocab.decode(list(new))


# ---- the stream ------------------------------------------------------------------------------


class Stream:
    """All state of one audio stream: audio front end, per-stage states, CTC collapses, policy,
    committed tokens, unit decoder and synthesiser, compute clock. Create with
    :meth:`Translator.create_stream`."""

    def __init__(self, translator: "Translator"):
        self._translator = translator
        self.clock = StageClock()
        self.stages = {name: TimedStage(stage, self.clock)
                       for name, stage in translator.stages.items()}
        self._new_audio()
        self._new_sentence(frame_base=0)
        self.sentences: list[EndOfSentence] = []  # every sentence ended so far, in order

    # ---- audio input ----------------------------------------------------------------------------

    def accept_waveform(self, sample_rate: int, samples: np.ndarray) -> None:
        """Append mono samples ``[n]`` (float, nominally [-1, 1]) at ``sample_rate`` (any n, any
        rate; resampled to 16 kHz). The rate may not change within a stream."""
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
        if self._resampler is None:
            self._resampler = StreamingResampler(int(sample_rate), MODEL_SAMPLE_RATE)
        elif self._resampler.in_rate != sample_rate:
            raise ValueError(f"sample_rate changed within the stream: expected "
                             f"{self._resampler.in_rate}, got {sample_rate}")
        self.features.accept_waveform(self._resampler.process(samples))

    def input_finished(self) -> None:
        """No more audio: the next :meth:`Translator.decode` flushes every output."""
        if self.input_done:
            return
        if self._resampler is not None:
            self.features.accept_waveform(self._resampler.flush())
        self.features.input_finished()
        self.input_done = True

    def reset(self) -> None:
        """Start a new sentence: every model state, counter and committed token is forgotten.

        Mid-stream (e.g. at a pause a VAD found) the audio not yet consumed by the encoder is kept
        and the next sentence starts at the next unprocessed segment; after ``input_finished`` the
        stream becomes a fresh one, ready for new audio (and its compute clock restarts).
        """
        if self.input_done:
            self.clock.reset()
            self._new_audio()
            self._new_sentence(frame_base=0)
        else:
            self._new_sentence(frame_base=self.next_segment_frame)
        self.sentences: list[EndOfSentence] = []

    @property
    def finished(self) -> bool:
        """The input was finished and every output (through ``EndOfStream``) has been returned."""
        return self._finished

    @property
    def next_segment_frame(self) -> int:
        """Absolute fbank frame where the next unprocessed encoder segment begins."""
        return self.frame_base + self.encoder_steps * self._translator.hop

    @property
    def committed_tokens(self) -> list[int]:
        return list(self.policy.committed)

    @property
    def asr_tokens(self) -> list[int]:
        return list(self.asr_ctc.tokens)

    # ---- internals ------------------------------------------------------------------------------

    def _new_audio(self) -> None:
        t = self._translator
        self.features = FeatureStream(t.config["features"], t.cmvn_mean, t.cmvn_std)
        self._resampler: StreamingResampler | None = None
        self.input_done = False

    def _new_sentence(self, frame_base: int) -> None:
        t, stages = self._translator, self.stages
        self.frame_base = frame_base  # fbank frame where this sentence's first segment starts
        self.encoder_steps = 0
        self.states: dict[str, StageState] = {
            name: stages[name].initial_state(1)
            for name in ("encoder", "st_ctc", "mt_source", "unit_decoder")
        }
        self.asr_ctc: IncrementalCTC = text_ctc(t.config)
        self.st_ctc: IncrementalCTC = text_ctc(t.config)
        self.unit_ctc: IncrementalCTC = unit_ctc(t.config)
        mt = t.config["mt"]
        decoder = IncrementalMTDecoder(stages["mt_decoder"], mt["eos"], mt["pad"], t.policy_config)
        self.policy = SimultaneousPolicy(decoder, t.policy_config, t.tgt_vocab.is_word_start,
                                         capacity=t.target_capacity)
        self.synthesizer = StreamingSynthesizer(stages["duration"], stages["vocoder"], t.config)
        self.num_samples = 0  # this sentence's speech samples
        self._finished = False


# ---- the translator --------------------------------------------------------------------------


class Translator:
    """Stateless simultaneous speech-to-speech translator over one set of stage graphs.

    Args:
        stages: stage name -> :class:`Stage` for every name in ``echostream.contract.STAGE_NAMES``.
        config: the model config dict (manifest ``config``).
        src_vocab / tgt_vocab: source (ASR) and target (ST / MT) vocabularies.
        cmvn_mean / cmvn_std: global CMVN ``[num_mel_bins]`` (None: identity).
        segment_ms: policy segment; a positive multiple of the encoder segment (S x 40 ms).
        policy: the policy knobs (its ``segment_ms`` is overridden by ``segment_ms``).
    Raises:
        SegmentSizeError: a segment size the encoder cannot serve.
    """

    def __init__(self, stages: Mapping[str, Stage], config: Mapping[str, Any],
                 src_vocab: Vocabulary, tgt_vocab: Vocabulary,
                 cmvn_mean: np.ndarray | None = None, cmvn_std: np.ndarray | None = None,
                 segment_ms: int = 320, policy: PolicyConfig | None = None):
        missing = [s for s in STAGE_NAMES if s not in stages]
        if missing:
            raise ArtifactError(f"the translator needs every stage {list(STAGE_NAMES)}; "
                                f"missing {missing}")
        self.stages = dict(stages)
        self.config = dict(config)
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.cmvn_mean, self.cmvn_std = cmvn_mean, cmvn_std
        self.steps_per_segment = steps_per_segment(self.config, segment_ms)
        self.policy_config = dataclasses.replace(policy or PolicyConfig(), segment_ms=segment_ms)
        self.window = encoder_window_frames(self.config)
        self.hop = encoder_hop_frames(self.config)
        self.segment_length = int(self.config["encoder"]["segment_length"])
        self.right_context = int(self.config["encoder"]["right_context"])
        self.source_capacity = sentence_source_frames(self.config)
        self.target_capacity = sentence_target_tokens(self.config)
        if self.steps_per_segment * self.segment_length > self.source_capacity:
            raise SegmentSizeError(
                f"segment_ms={segment_ms} holds {self.steps_per_segment * self.segment_length} "
                f"encoder frames, more than a sentence holds (max_source_frames="
                f"{self.source_capacity})")

    @property
    def segment_ms(self) -> int:
        return self.policy_config.segment_ms

    @classmethod
    def from_artifacts(cls, path: str | Path, backend: str = "onnxruntime", segment_ms: int = 320,
                       precision: str = "fp32", policy: PolicyConfig | None = None,
                       rehash: bool = False, **backend_opts: Any) -> "Translator":
        """Load an exported artifacts folder on ``backend`` ("onnxruntime", "tensorrt", "torch").

        ``rehash`` re-reads every file's sha256 (see ``load_artifacts``); ``backend_opts`` go to
        the backend (e.g. ``threads``, ``device``, ``deterministic``).
        """
        from echostream.runtime.artifacts import load_artifacts
        from echostream.runtime.backends import load_stages

        artifacts = load_artifacts(path, precision, rehash=rehash)
        steps_per_segment(artifacts.config, segment_ms)  # refuse before loading any graph
        stages = load_stages(artifacts, backend, STAGE_NAMES, **backend_opts)
        return cls(stages, artifacts.config, _vocabulary(artifacts, "src"),
                   _vocabulary(artifacts, "tgt"), artifacts.cmvn_mean, artifacts.cmvn_std,
                   segment_ms, policy)

    def create_stream(self) -> Stream:
        return Stream(self)

    # ---- decoding ------------------------------------------------------------------------------

    def decode(self, stream: Stream) -> list[Event]:
        """Run every policy step the stream's audio allows; after ``input_finished``, also the
        final flush (ending with :class:`EndOfStream`). Returns the new events, in order.

        A sentence that reaches a capacity (the next segment would not fit ``max_source_frames``,
        or ``max_target_tokens`` tokens are committed) is ended there: its translation is decoded
        to ``</s>``, its speech flushed, an :class:`EndOfSentence` says why, and the next segment
        starts a new sentence."""
        if stream._translator is not self:
            raise ValueError("this stream was created by another Translator")
        events: list[Event] = []
        while not stream.finished and self._segment_ready(stream):
            if self._source_full(stream, self.steps_per_segment):
                ready_ms = self._frames_ms(self._segment_end(stream))  # when the overflow is known
                events += self._end_sentence(stream, "source_capacity", ready_ms)
            events += self._segment_step(stream)
            if stream.policy.full:
                last_ms = self._frames_ms(self._segment_end(stream) - self.hop * self.steps_per_segment)
                events += self._end_sentence(stream, "target_capacity", last_ms)
        if stream.input_done and not stream.finished:
            events += self._final_step(stream)
        return events

    def _source_full(self, stream: Stream, steps: int) -> bool:
        """``steps`` more encoder steps would overflow the sentence's source capacity."""
        return (stream.encoder_steps + steps) * self.segment_length > self.source_capacity

    def _segment_ready(self, stream: Stream) -> bool:
        return stream.features.num_frames >= self._segment_end(stream)

    def _segment_end(self, stream: Stream) -> int:
        """Absolute fbank frame count the next segment's encoder windows read up to."""
        last = stream.encoder_steps + self.steps_per_segment - 1
        return self._window_start(stream, last) + self.window

    def _window_start(self, stream: Stream, step: int) -> int:
        """Absolute fbank frame where encoder step ``step``'s window starts (3 frames before its
        segment; frames before the sentence are read as zeros)."""
        return stream.frame_base + step * self.hop - ENCODER_WINDOW_LEAD

    def _segment_step(self, stream: Stream) -> list[Event]:
        source_ms = self._frames_ms(self._segment_end(stream))
        asr_before = stream.asr_ctc.count
        for _ in range(self.steps_per_segment):
            self._encoder_step(stream, self.segment_length)
        events = self._asr_event(stream, asr_before, source_ms)
        counts = CtcCounts(stream.asr_ctc.count, stream.st_ctc.count)
        outcome = stream.policy.step(counts, stream.states["mt_source"], source_finished=False)
        return events + self._write_events(stream, outcome, source_ms)

    def _final_step(self, stream: Stream) -> list[Event]:
        source_ms = stream_ms(stream)
        events: list[Event] = []
        while True:
            # Output frames of the full-utterance pass: the last R subsampled frames of the real
            # audio are only the final segment's right context (torchaudio Emformer.forward).
            fbank = stream.features.num_frames - stream.frame_base
            valid = max(0, encoder_frames(fbank) - self.right_context)
            remaining = math.ceil(valid / self.segment_length) - stream.encoder_steps
            if remaining > 0 and self._source_full(stream, 1):
                events += self._end_sentence(stream, "source_capacity", source_ms)
                continue
            asr_before = stream.asr_ctc.count
            while remaining > 0 and not self._source_full(stream, 1):
                done = stream.encoder_steps * self.segment_length
                self._encoder_step(stream, min(self.segment_length, valid - done))
                remaining -= 1
            events += self._asr_event(stream, asr_before, source_ms)
            if remaining <= 0:
                break
        events += self._end_sentence(stream, "end_of_input", source_ms)
        stream._finished = True
        sentences = stream.sentences
        ids = tuple(t for s in sentences for t in s.translation_ids)
        events.append(EndOfStream(
            source_ms, stream.clock.total_ms, _join(s.asr_text for s in sentences),
            _join(s.translation_text for s in sentences), ids,
            sum(s.num_samples for s in sentences)))
        return events

    def _end_sentence(self, stream: Stream, reason: str, source_ms: float) -> list[Event]:
        """Decode the sentence to ``</s>`` on the source it has, flush its speech, report it, and
        start the next sentence at the next unprocessed segment (states back to zero)."""
        events: list[Event] = []
        if stream.encoder_steps:  # a decode needs source frames to attend to
            counts = CtcCounts(stream.asr_ctc.count, stream.st_ctc.count)
            outcome = stream.policy.step(counts, stream.states["mt_source"], source_finished=True)
            events += self._write_events(stream, outcome, source_ms, flush=True)
        tgt = stream.policy.committed
        start_ms = stream.frame_base * float(self.config["features"]["frame_shift_ms"])
        end = EndOfSentence(reason, source_ms, stream.clock.total_ms, start_ms,
                            self.src_vocab.decode(stream.asr_ctc.tokens), self.tgt_vocab.decode(tgt),
                            tuple(tgt), stream.num_samples)
        stream.sentences.append(end)
        if reason != "end_of_input":
            stream._new_sentence(frame_base=stream.next_segment_frame)
        return events + [end]

    def _encoder_step(self, stream: Stream, valid: int) -> None:
        """One encoder step + ``st_ctc`` + ``mt_source``; the CTC collapses see only the ``valid``
        frames (fewer than S only in the zero-padded tail)."""
        start = self._window_start(stream, stream.encoder_steps)
        x = self._window_frames(stream.features, start, stream.frame_base)
        states, stages = stream.states, stream.stages
        out, states["encoder"] = stages["encoder"].run({"x": x}, states["encoder"])
        y = out["y"]
        st, states["st_ctc"] = stages["st_ctc"].run({"x": y}, states["st_ctc"])
        _, states["mt_source"] = stages["mt_source"].run({"x": y}, states["mt_source"])
        stream.asr_ctc.accept(out["asr_log_probs"][0, :valid])
        stream.st_ctc.accept(st["y"][0, :valid])
        stream.encoder_steps += 1
        # The next window starts one hop later: older frames are never read again.
        stream.features.discard_before(min(start + self.hop, stream.features.num_frames))

    def _window_frames(self, features: FeatureStream, start: int, first: int) -> np.ndarray:
        """``[1, 4(S+R)+3, 80]`` float32 fbank frames ``[start, start + window)``; frames before
        ``first`` (the sentence start) or past the end are zeros."""
        begin, end = max(start, first), min(start + self.window, features.num_frames)
        x = np.zeros((1, self.window, features.num_mel_bins), dtype=np.float32)
        if end > begin:
            x[0, begin - start:end - start] = features.frames(begin, end)
        return x

    def _frames_ms(self, frames: int) -> float:
        """Audio (ms) that must have arrived for ``frames`` fbank frames to exist (snip_edges)."""
        f = self.config["features"]
        return (frames - 1) * f["frame_shift_ms"] + f["frame_length_ms"]

    def _asr_event(self, stream: Stream, before: int, source_ms: float) -> list[Event]:
        tokens = stream.asr_ctc.tokens
        if len(tokens) == before:
            return []
        text = incremental_text(self.src_vocab, tokens[max(0, before - TEXT_CONTEXT):before],
                                tokens[before:])
        return [AsrText(text, tuple(tokens[before:]), source_ms, stream.clock.total_ms)]

    def _write_events(self, stream: Stream, outcome: PolicyOutcome, source_ms: float,
                      flush: bool = False) -> list[Event]:
        """Translation text for new tokens; speech for new text states (and the flush)."""
        events: list[Event] = []
        if outcome.tokens:
            committed = stream.policy.committed
            before = committed[:len(committed) - len(outcome.tokens)]
            text = incremental_text(self.tgt_vocab, before, outcome.tokens)
            events.append(TranslationText(text, tuple(outcome.tokens), source_ms,
                                          stream.clock.total_ms))
        units = self._units(stream, outcome.text_states)
        pieces = [stream.synthesizer.push(units)] if units else []
        if flush:
            pieces.append(stream.synthesizer.flush())
        samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        if units or samples.size:
            stream.num_samples += samples.size
            events.append(SpeechChunk(samples, stream.synthesizer.sample_rate, source_ms,
                                      tuple(units), stream.clock.total_ms))
        return events

    def _units(self, stream: Stream, text_states: Sequence[np.ndarray]) -> list[int]:
        """Text states ``[D]`` -> unit decoder -> incremental unit CTC -> new unit ids."""
        offset = int(self.config["unit"]["unit_offset"])
        units: list[int] = []
        for hidden in text_states:
            x = np.asarray(hidden, dtype=np.float32)[None]
            out, stream.states["unit_decoder"] = stream.stages["unit_decoder"].run(
                {"x": x}, stream.states["unit_decoder"])
            units += [c - offset for c in stream.unit_ctc.accept(out["y"][0])]
        return units


def stream_ms(stream: Stream) -> float:
    """Milliseconds of audio the stream has received (at the model rate)."""
    return 1000.0 * stream.features.num_samples / stream.features.sample_rate


def _join(texts: Iterable[str]) -> str:
    return " ".join(t for t in texts if t)


def _vocabulary(artifacts: Any, which: str) -> Vocabulary:
    symbols = getattr(artifacts, f"{which}_vocab")
    if symbols is None:
        raise ArtifactError(f"{artifacts.root}: the manifest lists no {which} vocabulary; the "
                            "translator needs both to emit text and to find word starts")
    return Vocabulary.from_symbols(symbols, placeholder=artifacts.vocab_placeholder,
                                   name=f"{artifacts.root} {which} vocabulary")


def encoder_frames(fbank_frames: int) -> int:
    """Encoder frames of the full pass over ``fbank_frames`` (two 3x3 stride-2 convs with padding
    1): ``(F - 1) // 4 + 1``, 0 for none."""
    return (fbank_frames - 1) // 4 + 1 if fbank_frames > 0 else 0


def steps_per_segment(config: Mapping[str, Any], segment_ms: int) -> int:
    """Encoder steps per policy segment; refuses a segment the exported encoder cannot serve."""
    seg_frames = int(config["encoder"]["segment_length"])
    unit_ms = seg_frames * ENCODER_FRAME_MS
    if (not isinstance(segment_ms, (int, np.integer)) or segment_ms <= 0
            or segment_ms % unit_ms):
        raise SegmentSizeError(
            f"segment size the encoder cannot serve: segment_ms={segment_ms!r}; expected a "
            f"positive multiple of the exported encoder segment ({seg_frames} frames x "
            f"{ENCODER_FRAME_MS} ms = {unit_ms} ms), e.g. {unit_ms}, {2 * unit_ms}, {4 * unit_ms}"
        )
    return int(segment_ms) // unit_ms
