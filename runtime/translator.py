"""The simultaneous translator: audio in, ASR text, translation and speech out, segment by segment.

sherpa-onnx's shape (DESIGN §6): a stateless :class:`Translator` (stage graphs, config,
vocabularies) and a :class:`~echostream.runtime.stream.Stream` per audio stream holding every
piece of state as data::

    translator = Translator.from_artifacts("engines/tiny", backend="onnxruntime", segment_ms=320)
    stream = translator.create_stream()
    stream.accept_waveform(48000, samples)          # any rate, any chunk size
    for event in translator.decode(stream): ...     # AsrText / TranslationText / SpeechChunk
    stream.input_finished()
    events = translator.decode(stream)              # ... then EndOfSentence, EndOfStream

    results = translator.decode_streams([s1, s2, s3])   # many streams, each stage once per round

The translator is the only caller of stages. A stream's work is a *program* (a generator that
says which stage to run on what and takes the outputs, ``runtime/scheduler.py``); the policy and
the synthesiser are such programs too. :meth:`Translator.decode_streams` runs every ready stream's
program in lock step and each round runs every stage once over all the streams that need it
(states stacked on axis 0), so streams at any position, in any sentence, batch; each stream's
events are exactly those it gets decoded alone.

One policy step per segment of ``segment_ms`` (a multiple of the exported encoder segment of S
frames x 40 ms, so a segment is k encoder steps). Per encoder step: the encoder reads a window of
4(S+R)+3 fbank frames starting 3 frames before its segment (zeros before the sentence), advancing
by 4S -> S frames ``y`` + ASR log-probs; ``st_ctc`` and ``mt_source`` consume ``y``; the ASR and
ST CTC collapses count tokens. Per segment: the StreamSpeech policy (``runtime/policy.py``)
decides READ or WRITE; each newly committed text state goes through ``unit_decoder`` (25
unit-CTC frames), the incremental unit collapse and the streaming synthesiser. A sentence starts
on ``unit_decoder_short`` when the artifacts have it (the same weights over
``sentence.short_target_tokens`` text states, so a short sentence's unit calls cost its own length)
and moves to ``unit_decoder`` with its caches padded when it outgrows it.

At the sentence capacity (``sentence.max_source_frames`` / ``max_target_tokens``) the sentence
ends: its translation is decoded to ``</s>``, its speech flushed, an ``EndOfSentence`` says why,
and the next segment starts a new sentence with fresh states.

With the chunk Conformer (``streamspeech`` presets) an encoder step is one attention chunk of C
frames: the window is 2 + 4C fbank frames (the first conv's left context, then the chunk)
advancing by 4C, ``segment_ms`` must be exactly C x 40 ms, and the last chunk at end of input
passes its real fbank frames as ``valid_frames``, so its encoder frames equal the full pass over
the sentence.

At end of input the fbank tail is zero-padded (in normalised feature space, i.e. the CMVN mean) so
the last partial segment and its right context can run; as in the full-utterance pass, the last R
encoder frames of the real audio are only right context, and CTC outputs past them are ignored; the
final decode runs to ``</s>`` and the synthesiser is flushed. Complete segments equal the full pass
exactly; a partial last segment cannot (the fixed-shape step sees padding where the full pass sees a
shorter segment).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from echostream.contract import (EXACT_STAGE_NAMES, OPTIONAL_STAGE_NAMES, STAGE_NAMES,
                                 UNIT_SHORT_STAGE, as_config,
                                 conformer_block_chunks, encoder_has_valid_input, encoder_hop_frames,
                                 encoder_kind, encoder_step_frames, encoder_window_frames,
                                 encoder_window_lead, fbank_frame_count, fbank_window_shift,
                                 sentence_source_frames, sentence_target_tokens,
                                 short_target_tokens, subsampled_frame_count)
from echostream.errors import ArtifactError, EchoStreamError
from echostream.runtime.ctc import text_ctc, unit_ctc
from echostream.runtime.events import (AsrText, EndOfSentence, EndOfStream, Event, SpeechChunk,
                                       TranslationText)
from echostream.runtime.endpoint import EndpointConfig, blank_where, decide, silent_rows
from echostream.runtime.exact import AgentBook, CallOutcome, agent_call, torch_call
from echostream.runtime.features import FeatureStream
from echostream.runtime.policy import (CtcCounts, MTState, PolicyConfig, PolicyOutcome,
                                       PolicyState, policy_step)
from echostream.runtime.scheduler import Program, StageCall, run_programs
from echostream.runtime.stage import Stage, grow_fifo_state
from echostream.runtime.stream import Sentence, Stream, Transcript
from echostream.runtime.synthesis import SynthesisState, SynthesisWindows, flush, push
from echostream.runtime.vocab import Vocabulary

ENCODER_FRAME_MS = 40  # one encoder frame = 4 fbank frames of 10 ms
SENTENCE_STAGES = ("encoder", "st_ctc", "mt_source", "unit_decoder")  # states kept per sentence


class SegmentSizeError(EchoStreamError, ValueError):
    """``segment_ms`` is not a whole number of exported encoder segments."""


class StreamDecodeError(EchoStreamError):
    """Decoding failed for some streams of a ``decode_streams`` call; the others were decoded.

    ``failures``: stream index -> exception; ``results``: every stream's events (a failed stream's
    list holds what it produced before it failed).
    """

    def __init__(self, failures: dict[int, BaseException], results: list[list[Event]]):
        first = next(iter(failures.values()))
        super().__init__(f"decoding failed for stream(s) {sorted(failures)}: {first}")
        self.failures, self.results = failures, results


# ---- text helpers ------------------------------------------------------------------------------


TEXT_CONTEXT = 8  # tokens of left context that decide spacing (keeps long streams O(1) per event)


def incremental_text(vocab: Vocabulary, before: Sequence[int], new: Sequence[int]) -> str:
    """Text that ``new`` adds after ``before`` (a leading space when it starts a word), so that
    the texts of successive events concatenate to the decoded whole."""
    context = list(before[-TEXT_CONTEXT:])
    full, head = vocab.decode(context + list(new)), vocab.decode(context)
    return full[len(head):] if full.startswith(head) else vocab.decode(list(new))


# ---- the translator --------------------------------------------------------------------------


class Translator:
    """Stateless simultaneous speech-to-speech translator over one set of stage graphs.

    Args:
        stages: stage name -> :class:`Stage` for every name in ``echostream.contract.STAGE_NAMES``
            (and ``unit_decoder_short`` if the artifacts have it: see ``_unit_stage``).
        config: the model config dict (manifest ``config``).
        src_vocab / tgt_vocab: source (ASR) and target (ST / MT) vocabularies.
        cmvn_mean / cmvn_std: global CMVN ``[num_mel_bins]`` (None: identity).
        segment_ms: policy segment; a positive multiple of the encoder segment (S x 40 ms).
        policy: the policy knobs (its ``segment_ms`` is overridden by ``segment_ms``).
    Raises:
        SegmentSizeError: a segment size the encoder cannot serve.

    Examples:
        >>> translator = Translator.from_artifacts("engines/tiny")
        >>> a, b = translator.create_stream(), translator.create_stream()
        >>> a.accept_waveform(16000, audio_a); b.accept_waveform(16000, audio_b)
        >>> events_a, events_b = translator.decode_streams([a, b])
    """

    def __init__(self, stages: Mapping[str, Stage], config: Mapping[str, Any],
                 src_vocab: Vocabulary, tgt_vocab: Vocabulary,
                 cmvn_mean: np.ndarray | None = None, cmvn_std: np.ndarray | None = None,
                 segment_ms: int = 320, policy: PolicyConfig | None = None,
                 fidelity: str = "incremental", exact_agent: Callable[[], Any] | None = None,
                 endpoint: EndpointConfig | None = None):
        if fidelity not in FIDELITIES:
            raise ValueError(f"fidelity expected one of {list(FIDELITIES)}, got {fidelity!r}")
        needed = required_stages(fidelity, exact_agent is not None)
        missing = [s for s in needed if s not in stages]
        if missing:
            raise ArtifactError(f"the {fidelity} translator needs the stages {list(needed)}; "
                                f"missing {missing}" + (
                                    " (export with --sentence-graphs for --fidelity exact)"
                                    if "unit_sentence" in missing else ""))
        self.fidelity = fidelity
        self.exact_agent = exact_agent  # fidelity "exact" on the PyTorch reference agent
        self.endpoint = endpoint
        self.stages = dict(stages)
        self.config = dict(config)  # the manifest's form (JSON types)
        self.cfg = as_config(self.config)  # the typed form everything here reads
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.cmvn_mean, self.cmvn_std = cmvn_mean, cmvn_std
        self.steps_per_segment = steps_per_segment(self.config, segment_ms)
        self.policy_config = dataclasses.replace(policy or PolicyConfig(), segment_ms=segment_ms)
        self.window = encoder_window_frames(self.config)
        self.hop = encoder_hop_frames(self.config)
        self.lead = encoder_window_lead(self.config)
        self.valid_input = encoder_has_valid_input(self.config)
        self.segment_length = encoder_step_frames(self.config)  # encoder frames per encoder call
        self.right_context = self.cfg.encoder.right_context
        self.source_capacity = sentence_source_frames(self.config)
        self.target_capacity = sentence_target_tokens(self.config)
        self.synthesis = SynthesisWindows.from_config(self.config)
        self.eos, self.pad = self.cfg.mt.eos, self.cfg.mt.pad
        self.unit_offset = self.cfg.unit.unit_offset
        # Text states the short unit-decoder graph holds (0: the artifacts have none).
        self.unit_short = short_target_tokens(self.cfg) if UNIT_SHORT_STAGE in self.stages else 0
        if fidelity == "exact":
            check_exact(self.cfg, segment_ms)
        check_endpoint(endpoint, fidelity, self.cfg)
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
                       rehash: bool = False, fidelity: str = "incremental",
                       endpoint: EndpointConfig | None = None,
                       **backend_opts: Any) -> "Translator":
        """Load an exported artifacts folder on ``backend`` ("onnxruntime", "tensorrt", "torch").

        ``rehash`` re-reads every file's sha256 (see ``load_artifacts``); ``backend_opts`` go to
        the backend (e.g. ``threads``, ``device``, ``deterministic``).
        """
        from echostream.runtime.artifacts import load_artifacts

        artifacts = load_artifacts(path, precision, rehash=rehash)
        steps_per_segment(artifacts.config, segment_ms)  # refuse before loading any graph
        check_endpoint(endpoint, fidelity, as_config(artifacts.config))  # before loading graphs
        return cls.from_loaded(artifacts, backend, segment_ms, policy, fidelity, endpoint,
                               **backend_opts)

    @classmethod
    def from_loaded(cls, artifacts: Any, backend: str = "onnxruntime", segment_ms: int = 320,
                    policy: PolicyConfig | None = None, fidelity: str = "incremental",
                    endpoint: EndpointConfig | None = None,
                    **backend_opts: Any) -> "Translator":
        """A translator over already loaded (verified) ``Artifacts`` on ``backend``.

        ``fidelity="exact"`` on the ``torch`` backend runs StreamSpeech's agent as the PyTorch
        reference computes it; on the other backends the agent on the stage graphs (which needs
        the artifacts' sentence graphs)."""
        from echostream.runtime.backends import backend_module, load_stages

        if fidelity == "exact":
            check_exact(as_config(artifacts.config), segment_ms)
        agent = None
        if fidelity == "exact" and backend == "torch":
            agent = backend_module("torch").exact_agent_factory(
                artifacts, dataclasses.replace(policy or PolicyConfig(), segment_ms=segment_ms),
                _vocabulary(artifacts, "tgt").is_word_start)
        needed = required_stages(fidelity, agent is not None)
        absent = [s for s in needed if s not in artifacts.stages]
        if absent:
            raise ArtifactError(f"{artifacts.root}: --fidelity {fidelity} needs the stage graphs "
                                f"{absent}, which these artifacts lack; re-export with "
                                "--sentence-graphs")
        optional = tuple(s for s in OPTIONAL_STAGE_NAMES if s in artifacts.stages)
        stages = load_stages(artifacts, backend, needed + optional, **backend_opts)
        return cls(stages, artifacts.config, _vocabulary(artifacts, "src"),
                   _vocabulary(artifacts, "tgt"), artifacts.cmvn_mean, artifacts.cmvn_std,
                   segment_ms, policy, fidelity, agent, endpoint)

    # ---- streams ---------------------------------------------------------------------------------

    def create_stream(self) -> Stream:
        return Stream(self, self._features(), self._sentence(0))

    def reset(self, stream: Stream) -> None:
        """Start a new sentence in ``stream`` (see ``Stream.reset``)."""
        self._check_owner(stream)
        if stream.input_done:
            stream.clock.reset()
            stream.features, stream.resampler, stream.input_done = self._features(), None, False
            stream.finished = False
            stream.transcript = Transcript()
            stream.sentence = self._sentence(0)
        else:
            stream.sentence = self._sentence(stream.next_segment_frame)

    def _features(self) -> FeatureStream:
        return FeatureStream(self.cfg.features, self.cmvn_mean, self.cmvn_std)

    def _sentence(self, frame_base: int) -> Sentence:
        states = {name: self.stages[name].initial_state(1) for name in SENTENCE_STAGES}
        if self.unit_short:  # the sentence starts on the short unit-decoder graph
            states["unit_decoder"] = self.stages[UNIT_SHORT_STAGE].initial_state(1)
        mt = MTState(self.stages["mt_decoder"].initial_state(1))
        sentence = Sentence(frame_base, states, text_ctc(self.cfg), text_ctc(self.cfg),
                            unit_ctc(self.cfg), PolicyState(mt, capacity=self.target_capacity),
                            SynthesisState())
        if self.fidelity == "exact":
            sentence.exact = AgentBook()
            sentence.agent = self.exact_agent() if self.exact_agent is not None else None
        return sentence

    def _check_owner(self, stream: Stream) -> None:
        if stream.translator is not self:
            raise ValueError("this stream was created by another Translator")

    # ---- decoding ------------------------------------------------------------------------------

    def decode(self, stream: Stream) -> list[Event]:
        """Run every policy step the stream's audio allows; after ``input_finished``, also the
        final flush (ending with :class:`EndOfStream`). Returns the new events, in order."""
        try:
            return self.decode_streams([stream])[0]
        except StreamDecodeError as exc:
            raise exc.failures[0] from None

    def decode_streams(self, streams: Sequence[Stream]) -> list[list[Event]]:
        """Decode several streams at once: each round runs every stage once over all the streams
        that need it. Returns each stream's new events, in the order of ``streams``.

        Raises:
            StreamDecodeError: some streams failed (the others were decoded; see its fields).
        """
        for stream in streams:
            self._check_owner(stream)
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("decode_streams got the same stream twice")
        results: list[list[Event]] = [[] for _ in streams]
        programs = [self._program(s, out) for s, out in zip(streams, results)]
        _, failures = run_programs(self.stages, programs, [s.clock.on_call for s in streams])
        if failures:
            raise StreamDecodeError({f.index: f.error for f in failures}, results)
        return results

    def _program(self, stream: Stream, events: list[Event]) -> Program:
        """Everything the stream's audio allows now; events are appended to ``events``."""
        if self.fidelity == "exact":
            yield from self._exact_program(stream, events)
            return
        while not stream.finished and self._segment_ready(stream):
            s = stream.sentence
            if self._source_full(s, self.steps_per_segment):
                ready_ms = self._frames_ms(self._segment_end(s))  # when the overflow is known
                events += yield from self._end_sentence(stream, "source_capacity", ready_ms)
            events += yield from self._segment_step(stream)
            if stream.sentence.policy.full:
                events += yield from self._end_sentence(stream, "target_capacity",
                                                        self._processed_ms(stream.sentence))
            elif self.endpoint is not None:
                events += yield from self._endpoint(stream)
        if stream.input_done and not stream.finished:
            events += yield from self._final_step(stream)

    # ---- the exact fidelity mode (runtime/exact.py) -----------------------------------------

    def _exact_program(self, stream: Stream, events: list[Event]) -> Program:
        """StreamSpeech's agent: one call per segment of audio on every sample so far."""
        seg = self.segment_ms * self.cfg.features.sample_rate // 1000
        while not stream.finished:
            boundary = (stream.calls + 1) * seg
            received = stream.features.num_samples
            if received > boundary:
                samples, finished = boundary, False
            elif stream.input_done:
                samples, finished = received, True
            else:
                return
            stream.calls += 1
            end = fbank_frames(samples, self.cfg.features)
            source_ms = 1000.0 * samples / self.cfg.features.sample_rate
            cap = self._exact_capacity_end(stream.sentence)
            if end > cap:  # the call would not fit the sentence: end it at its last whole chunk
                events += yield from self._exact_call(stream, cap, True, source_ms)
                events += self._exact_end(stream, "source_capacity", source_ms, next_frame=cap)
            events += yield from self._exact_call(stream, end, finished, source_ms)
            if finished:
                events += self._exact_end(stream, "end_of_input", source_ms)
                events.append(self._end_of_stream(stream, source_ms))
                stream.finished = True
            elif len(stream.sentence.exact.reported_translation) >= self.target_capacity:
                events += yield from self._exact_call(stream, end, True, source_ms)
                events += self._exact_end(stream, "target_capacity", source_ms, next_frame=end)

    def _exact_capacity_end(self, s: Sentence) -> int:
        """The fbank frame where the sentence's source capacity (whole encoder steps) ends."""
        steps = self.source_capacity // self.segment_length
        return s.frame_base + steps * self.hop + (self.window - self.hop - self.lead)

    def _exact_call(self, stream: Stream, end: int, finished: bool, source_ms: float) -> Program:
        s = stream.sentence
        if s.agent is not None:  # the PyTorch reference agent computes the call itself
            frames = stream.features.frames(s.frame_base, max(end, s.frame_base))
            outcome = torch_call(s.agent, frames, finished)
        else:
            outcome = yield from agent_call(self, stream, end, finished)
        return self._exact_events(stream, outcome, source_ms)

    def _exact_events(self, stream: Stream, outcome: CallOutcome, source_ms: float) -> list[Event]:
        """Events for what the call changed: ASR and translation hypotheses (with what they take
        back), and speech for the newly voiced units."""
        s, book = stream.sentence, stream.sentence.exact
        events: list[Event] = []
        for kind, vocab, reported, now in (
                (AsrText, self.src_vocab, book.reported_asr, outcome.asr_tokens),
                (TranslationText, self.tgt_vocab, book.reported_translation, outcome.translation)):
            keep = common_prefix(reported, now)
            if keep == len(reported) == len(now):
                continue
            text = incremental_text(vocab, now[:keep], now[keep:])
            events.append(kind(text, tuple(now[keep:]), source_ms, stream.clock.total_ms,
                               replaces=len(reported) - keep))
            reported[:] = now
        if outcome.new_units:
            s.num_samples += outcome.samples.size
            events.append(SpeechChunk(outcome.samples, self.synthesis.sample_rate, source_ms,
                                      tuple(outcome.new_units), stream.clock.total_ms))
        return events

    def _exact_end(self, stream: Stream, reason: str, source_ms: float,
                   next_frame: int | None = None) -> list[Event]:
        s, book = stream.sentence, stream.sentence.exact
        tgt = book.reported_translation
        end = EndOfSentence(reason, source_ms, stream.clock.total_ms,
                            s.frame_base * float(self.cfg.features.frame_shift_ms),
                            self.src_vocab.decode(book.reported_asr), self.tgt_vocab.decode(tgt),
                            tuple(tgt), s.num_samples)
        stream.transcript.add(end)
        if next_frame is not None:
            # the next sentence starts where this one's last whole chunk ended
            steps = max(0, (next_frame - s.frame_base - (self.window - self.hop - self.lead))
                        // self.hop)
            stream.sentence = self._sentence(s.frame_base + steps * self.hop)
        return [end]

    def commit_encoder(self, stream: Stream, end: int, finished: bool) -> Program:
        """Encode every chunk complete before fbank frame ``end`` into the sentence's kept states
        (at the end of the input also the Emformer's zero-padded tail)."""
        s = stream.sentence
        while self.window_start(s, s.encoder_steps) + self.window <= end \
                and not self._source_full(s, 1):
            yield from self._encoder_step(stream, self.segment_length, end)
        if finished and not self.valid_input:  # the Emformer's tail, as the incremental mode
            valid = max(0, subsampled_frame_count(end - s.frame_base) - self.right_context)
            while s.encoder_steps * self.segment_length < valid and not self._source_full(s, 1):
                done = s.encoder_steps * self.segment_length
                yield from self._encoder_step(stream, min(self.segment_length, valid - done), end)

    def partial_rows(self, s: Sentence, end: int) -> int:
        """Encoder frames of the chunk in progress at fbank frame ``end`` (chunk Conformer; the
        Emformer has no partial segment: 0)."""
        if not self.valid_input:
            return 0
        done = s.encoder_steps * self.segment_length
        return max(0, subsampled_frame_count(end - s.frame_base) - done)

    def _end_of_stream(self, stream: Stream, source_ms: float) -> EndOfStream:
        said = stream.transcript
        return EndOfStream(source_ms, stream.clock.total_ms, " ".join(said.asr_texts),
                           " ".join(said.translation_texts), tuple(said.translation_ids),
                           said.num_samples)

    # ---- endpoints and capacity ------------------------------------------------------------

    def _endpoint(self, stream: Stream) -> Program:
        """The endpoint rules after a segment (``runtime/endpoint.py``)."""
        s = stream.sentence
        rule = decide(s.asr_ctc.trailing_blank * ENCODER_FRAME_MS, s.asr_ctc.count > 0,
                      self.endpoint)
        if rule == "pause":
            return (yield from self._end_sentence(stream, "pause", self._processed_ms(s)))
        if rule == "silence" and not s.policy.committed:
            stream.sentence = self._next_sentence(stream)  # nothing was said: no event
        return []

    def _next_sentence(self, stream: Stream) -> Sentence:
        """A fresh sentence at the next unprocessed segment; with ``carry_encoder`` the encoder
        state goes on (and the frames before the sentence stay real to it)."""
        old = stream.sentence
        new = self._sentence(stream.next_segment_frame)
        if self.endpoint is not None and self.endpoint.carry_encoder:
            new.states["encoder"] = old.states["encoder"]
            new.encoder_origin = old.frame_base if old.encoder_origin is None else old.encoder_origin
        return new

    def _source_full(self, s: Sentence, steps: int) -> bool:
        """``steps`` more encoder steps would overflow the sentence's source capacity."""
        return (s.encoder_steps + steps) * self.segment_length > self.source_capacity

    def _segment_ready(self, stream: Stream) -> bool:
        return stream.features.num_frames >= self._segment_end(stream.sentence)

    def _segment_end(self, s: Sentence) -> int:
        """Absolute fbank frame count the next segment's encoder windows read up to."""
        return self.window_start(s, s.encoder_steps + self.steps_per_segment - 1) + self.window

    def _processed_ms(self, s: Sentence) -> float:
        """Source time of the last processed segment's windows."""
        return self._frames_ms(self.window_start(s, s.encoder_steps - 1) + self.window)

    def window_start(self, s: Sentence, step: int) -> int:
        """Absolute fbank frame where encoder step ``step``'s window starts (``lead`` frames before
        its segment: 3 for the Emformer, 2 for the chunk Conformer; frames before the sentence are
        read as zeros)."""
        return s.frame_base + step * self.hop - self.lead

    def _segment_step(self, stream: Stream) -> Program:
        s = stream.sentence
        source_ms = self._frames_ms(self._segment_end(s))
        asr_before = s.asr_ctc.count
        for _ in range(self.steps_per_segment):
            yield from self._encoder_step(stream, self.segment_length)
        events = self._asr_event(stream, asr_before, source_ms)
        counts = CtcCounts(s.asr_ctc.count, s.st_ctc.count)
        outcome = yield from self._policy(s, counts, source_finished=False)
        events += yield from self._write_events(stream, outcome, source_ms)
        return events

    def _policy(self, s: Sentence, counts: CtcCounts, source_finished: bool) -> Program:
        return (yield from policy_step(s.policy, counts, s.states["mt_source"], source_finished,
                                       self.policy_config, self.tgt_vocab.is_word_start,
                                       self.eos, self.pad))

    def _final_step(self, stream: Stream) -> Program:
        source_ms = stream.received_ms
        events: list[Event] = []
        while True:
            s = stream.sentence
            # Output frames of the full-utterance pass: the last R subsampled frames of the real
            # audio are only the final segment's right context (torchaudio Emformer.forward).
            fbank = stream.features.num_frames - s.frame_base
            valid = max(0, subsampled_frame_count(fbank) - self.right_context)
            remaining = math.ceil(valid / self.segment_length) - s.encoder_steps
            if remaining > 0 and self._source_full(s, 1):
                events += yield from self._end_sentence(stream, "source_capacity", source_ms)
                continue
            asr_before = s.asr_ctc.count
            while remaining > 0 and not self._source_full(s, 1):
                done = s.encoder_steps * self.segment_length
                yield from self._encoder_step(stream, min(self.segment_length, valid - done))
                remaining -= 1
            events += self._asr_event(stream, asr_before, source_ms)
            if remaining <= 0:
                break
        events += yield from self._end_sentence(stream, "end_of_input", source_ms)
        stream.finished = True
        events.append(self._end_of_stream(stream, source_ms))
        return events

    def _end_sentence(self, stream: Stream, reason: str, source_ms: float) -> Program:
        """Decode the sentence to ``</s>`` on the source it has, flush its speech, report it, and
        start the next sentence at the next unprocessed segment (states back to zero)."""
        s = stream.sentence
        events: list[Event] = []
        if s.encoder_steps:  # a decode needs source frames to attend to
            counts = CtcCounts(s.asr_ctc.count, s.st_ctc.count)
            outcome = yield from self._policy(s, counts, source_finished=True)
            events += yield from self._write_events(stream, outcome, source_ms, flush_speech=True)
        tgt = s.policy.committed
        start_ms = s.frame_base * float(self.cfg.features.frame_shift_ms)
        end = EndOfSentence(reason, source_ms, stream.clock.total_ms, start_ms,
                            self.src_vocab.decode(s.asr_ctc.tokens), self.tgt_vocab.decode(tgt),
                            tuple(tgt), s.num_samples)
        stream.transcript.add(end)
        if reason != "end_of_input":
            stream.sentence = self._next_sentence(stream)
        return events + [end]

    def _encoder_step(self, stream: Stream, valid: int, end: int | None = None) -> Program:
        """One encoder step + ``st_ctc`` + ``mt_source``; the CTC collapses see only the ``valid``
        frames (fewer than S only in the zero-padded tail); fbank frames from ``end`` on are read
        as zeros (the exact mode's calls see only the audio of their call)."""
        s = stream.sentence
        start = self.window_start(s, s.encoder_steps)
        out, s.states["encoder"] = yield StageCall("encoder",
                                                   self.encoder_inputs(stream, start, end),
                                                   s.states["encoder"])
        y = out["y"]
        st, s.states["st_ctc"] = yield StageCall("st_ctc", {"x": y}, s.states["st_ctc"])
        _, s.states["mt_source"] = yield StageCall("mt_source", {"x": y}, s.states["mt_source"])
        s.asr_ctc.accept(self._gated(out["asr_log_probs"][0, :valid], stream.window))
        s.st_ctc.accept(st["y"][0, :valid])
        s.encoder_steps += 1
        # The next window starts one hop later: older frames are never read again.
        stream.features.discard_before(min(start + self.hop, stream.features.num_frames))

    def _gated(self, asr_log_probs: np.ndarray, window: np.ndarray) -> np.ndarray:
        """The ASR log-probs ``[valid, V]`` through the endpoint's energy gate (if any)."""
        floor = None if self.endpoint is None else self.endpoint.silence_floor
        if floor is None or not len(asr_log_probs):
            return asr_log_probs
        silent = silent_rows(window[0], self.lead, len(asr_log_probs), self.hop // self.segment_length,
                             floor, self.cmvn_mean, self.cmvn_std)
        return blank_where(asr_log_probs, silent, self.cfg.ctc.blank)

    def encoder_inputs(self, stream: Stream, start: int,
                       end: int | None = None) -> dict[str, np.ndarray]:
        """The window at ``start``, and for the chunk Conformer the chunk's real fbank frames
        (``4C``; fewer only in the last chunk at end of input, or in the exact mode's partial
        chunk, which the graph then computes as the full pass over the shorter sentence does)."""
        end = stream.features.num_frames if end is None else end
        s = stream.sentence
        first = s.frame_base if s.encoder_origin is None else s.encoder_origin
        inputs = {"x": self._window_frames(stream, start, first, end)}
        if self.valid_input:
            real = end - (start + self.lead)
            inputs["valid_frames"] = np.array([min(max(real, 1), self.hop)], np.int32)
        return inputs

    def _window_frames(self, stream: Stream, start: int, first: int, end: int) -> np.ndarray:
        """``[1, window, 80]`` float32 fbank frames ``[start, start + window)``; frames before
        ``first`` (the sentence start) or from ``end`` on are zeros. The stream's window buffer is
        reused: a stage never keeps its inputs past the call."""
        features = stream.features
        if stream.window is None:
            stream.window = np.zeros((1, self.window, features.num_mel_bins), dtype=np.float32)
        x = stream.window
        lo, hi = max(start, first) - start, min(start + self.window, end) - start
        x[0, :max(lo, 0)] = 0.0
        if hi > lo:
            x[0, lo:hi] = features.frames(start + lo, start + hi)
        x[0, max(hi, lo, 0):] = 0.0
        return x

    def _frames_ms(self, frames: int) -> float:
        """Audio (ms) that must have arrived for ``frames`` fbank frames to exist (snip_edges)."""
        f = self.cfg.features
        return (frames - 1) * f.frame_shift_ms + f.frame_length_ms

    def _asr_event(self, stream: Stream, before: int, source_ms: float) -> list[Event]:
        tokens = stream.sentence.asr_ctc.tokens
        if len(tokens) == before:
            return []
        text = incremental_text(self.src_vocab, tokens[max(0, before - TEXT_CONTEXT):before],
                                tokens[before:])
        return [AsrText(text, tuple(tokens[before:]), source_ms, stream.clock.total_ms)]

    def _write_events(self, stream: Stream, outcome: PolicyOutcome, source_ms: float,
                      flush_speech: bool = False) -> Program:
        """Translation text for new tokens; speech for new text states (and the flush)."""
        s = stream.sentence
        events: list[Event] = []
        if outcome.tokens:
            committed, new = s.policy.committed, len(outcome.tokens)
            before = committed[max(0, len(committed) - new - TEXT_CONTEXT):len(committed) - new]
            text = incremental_text(self.tgt_vocab, before, outcome.tokens)
            events.append(TranslationText(text, tuple(outcome.tokens), source_ms,
                                          stream.clock.total_ms))
        units = yield from self._units(s, outcome.text_states)
        pieces = [(yield from push(s.synthesis, self.synthesis, units))] if units else []
        if flush_speech:
            pieces.append((yield from flush(s.synthesis, self.synthesis)))
        samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        if units or samples.size:
            s.num_samples += samples.size
            events.append(SpeechChunk(samples, self.synthesis.sample_rate, source_ms,
                                      tuple(units), stream.clock.total_ms))
        return events

    def _units(self, s: Sentence, text_states: Sequence[np.ndarray]) -> Program:
        """Text states ``[D]`` -> unit decoder -> incremental unit CTC -> new unit ids."""
        units: list[int] = []
        for hidden in text_states:
            x = np.asarray(hidden, dtype=np.float32)[None]
            stage = self._unit_stage(s)
            out, s.states["unit_decoder"] = yield StageCall(stage, {"x": x},
                                                            s.states["unit_decoder"])
            s.unit_text_states += 1
            units += [c - self.unit_offset for c in s.unit_ctc.accept(out["y"][0])]
        return units

    def _unit_stage(self, s: Sentence) -> str:
        """The unit-decoder graph for the sentence's next text state: the short one while its
        caches hold the sentence; at its capacity the state moves to the full graph, padded."""
        if s.unit_text_states < self.unit_short:
            return UNIT_SHORT_STAGE
        if self.unit_short and s.unit_text_states == self.unit_short:
            short, full = self.stages[UNIT_SHORT_STAGE], self.stages["unit_decoder"]
            grown = grow_fifo_state(short.state_to_host(s.states["unit_decoder"]), full.contract)
            s.states["unit_decoder"] = full.state_from_host(grown)
        return "unit_decoder"


FIDELITIES = ("incremental", "exact")


def required_stages(fidelity: str, reference_agent: bool = False) -> tuple[str, ...]:
    """The stage graphs a translator of ``fidelity`` runs (the PyTorch reference agent of the
    exact mode computes everything itself but keeps the incremental stages for the clock)."""
    if fidelity == "exact" and not reference_agent:
        return STAGE_NAMES + EXACT_STAGE_NAMES
    return STAGE_NAMES


def check_endpoint(endpoint: EndpointConfig | None, fidelity: str, cfg) -> None:
    """Refuse endpoint settings the mode or the encoder cannot honour (one line)."""
    if endpoint is None:
        return
    if fidelity == "exact":
        raise ValueError("endpointing is off in the exact fidelity mode (StreamSpeech's agent "
                         "translates one utterance); pass no endpoint with --fidelity exact")
    if endpoint.carry_encoder and cfg.encoder.kind != "emformer":
        raise ValueError("carry_encoder needs the Emformer: the chunk Conformer's cache is the "
                         "sentence itself")


def check_exact(cfg, segment_ms: int) -> None:
    """Refuse what the exact mode cannot reproduce (one line naming what is allowed)."""
    if cfg.encoder.kind == "conformer" and conformer_block_chunks(cfg.encoder.chunk_size) > 1:
        raise SegmentSizeError(
            f"--fidelity exact cannot serve segment_ms={segment_ms}: its conv chunk does not "
            f"divide the attention chunk {cfg.encoder.chunk_size}, so StreamSpeech revises a chunk "
            "one call later; export a chunk of 8 or 16 frames (320 or 640 ms) for the exact mode")


def fbank_frames(samples: int, features) -> int:
    """Fbank frames (snip_edges) of ``samples`` samples: whole windows only."""
    return fbank_frame_count(samples, *fbank_window_shift(
        features.sample_rate, features.frame_length_ms, features.frame_shift_ms))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _vocabulary(artifacts: Any, which: str) -> Vocabulary:
    symbols = getattr(artifacts, f"{which}_vocab")
    if symbols is None:
        raise ArtifactError(f"{artifacts.root}: the manifest lists no {which} vocabulary; the "
                            "translator needs both to emit text and to find word starts")
    return Vocabulary.from_symbols(symbols, placeholder=artifacts.vocab_placeholder,
                                   name=f"{artifacts.root} {which} vocabulary")


def steps_per_segment(config: Mapping[str, Any], segment_ms: int) -> int:
    """Encoder steps per policy segment; refuses a segment the exported encoder cannot serve."""
    if encoder_kind(config) == "conformer":
        return conformer_steps_per_segment(config, segment_ms)
    seg_frames = as_config(config).encoder.segment_length
    unit_ms = seg_frames * ENCODER_FRAME_MS
    if (not isinstance(segment_ms, (int, np.integer)) or segment_ms <= 0
            or segment_ms % unit_ms):
        raise SegmentSizeError(
            f"segment size the encoder cannot serve: segment_ms={segment_ms!r}; expected a "
            f"positive multiple of the exported encoder segment ({seg_frames} frames x "
            f"{ENCODER_FRAME_MS} ms = {unit_ms} ms), e.g. {unit_ms}, {2 * unit_ms}, {4 * unit_ms}"
        )
    return int(segment_ms) // unit_ms


def conformer_steps_per_segment(config: Mapping[str, Any], segment_ms: int) -> int:
    """The chunk Conformer serves exactly one segment size: its exported chunk C x 40 ms
    (StreamSpeech's agent sets the chunk to ``segment_ms // 40``; another segment would need
    another graph)."""
    chunk = encoder_step_frames(config)
    allowed = chunk * ENCODER_FRAME_MS
    if not isinstance(segment_ms, (int, np.integer)) or segment_ms != allowed:
        raise SegmentSizeError(
            f"segment size the chunk Conformer cannot serve: segment_ms={segment_ms!r}; expected "
            f"{allowed} (its exported chunk of {chunk} frames x {ENCODER_FRAME_MS} ms)")
    return 1
