"""Chunking invariance (issue #7.1): however the audio arrives, the runtime answers the same.

Property: for a fixed few-second signal, feeding it to a stream in *any* chunking -- chunks from 0
(empty) samples to 10 s, ``decode`` called after some chunks and not others, float32 or float64
chunks -- gives exactly the events of feeding it whole: the same token ids, unit ids, delays and
sample counts, and bit-identical speech samples. The property is checked by hypothesis over >= 50
generated chunkings (derandomized, no example database: every CI run tries the same cases) at four
input rates (16 kHz direct; 8, 44.1 and 48 kHz through the streaming resampler) and three policy
segment sizes (160, 320 ms, and 640 ms, which switches the policy to whole-word commits).

Why it can fail: the fbank front end, the resampler, the encoder window bookkeeping, the frame
discarding and the policy's segment loop all see chunk boundaries; any of them keying off the
chunk (instead of the absolute stream position) changes the events.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from echostream.runtime.events import AsrText, EndOfStream, SpeechChunk, TranslationText
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.translator import Translator

RATES = (16000, 8000, 44100, 48000)
SEGMENTS_MS = (160, 320, 640)
SECONDS = 2.5
POLICY = PolicyConfig(final_max_len=12)  # keeps the final decode-to-</s> short
MAX_CHUNK_S = 10.0


def signal(rate: int, seconds: float = SECONDS) -> np.ndarray:
    """The fixed test signal at ``rate``: ``[n]`` float32 in [-0.6, 0.6].

    A 150 Hz -> 3.5 kHz chirp under a 3 Hz syllable-like envelope, with two 0.3 s gaps of
    silence: random-weight models emit several ASR / translation tokens and units on it, so the
    events have structure to get wrong. Defined analytically, so every rate carries the same sound.
    """
    t = np.arange(int(seconds * rate)) / rate
    sweep = 150.0 + 3350.0 * t / seconds
    envelope = 0.35 + 0.25 * np.sin(2 * np.pi * 3.0 * t)
    x = envelope * np.sin(2 * np.pi * np.cumsum(sweep) / rate)
    x[(t > 0.8) & (t < 1.1)] = 0.0
    x[(t > 1.7) & (t < 2.0)] = 0.0
    return x.astype(np.float32)


def run(translator: Translator, samples: np.ndarray, rate: int,
        plan: list[tuple[int, bool, bool]] = ()) -> list:
    """Feed ``samples`` by ``plan`` (chunk size, decode after it?, as float64?), then the rest in
    one chunk, then finish. Returns every event in order."""
    stream = translator.create_stream()
    events, pos = [], 0
    for size, decode, wide in plan:
        chunk = samples[pos:pos + size]  # may be empty, also once the signal is used up
        stream.accept_waveform(rate, chunk.astype(np.float64) if wide else chunk)
        pos += chunk.size
        if decode:
            events += translator.decode(stream)
    stream.accept_waveform(rate, samples[pos:])
    events += translator.decode(stream)
    stream.input_finished()
    events += translator.decode(stream)
    assert stream.finished
    return events


def assert_same_events(a: list, b: list) -> None:
    """The same events: types, kinds and what a hypothesis takes back, the projection exactly,
    speech samples within 1e-5."""
    assert [type(e) for e in a] == [type(e) for e in b]
    assert [getattr(e, "replaces", 0) for e in a] == [getattr(e, "replaces", 0) for e in b]
    assert projection(a) == projection(b)
    for x, y in zip(a, b):
        if isinstance(x, SpeechChunk):
            np.testing.assert_allclose(x.samples, y.samples, atol=1e-5, rtol=0)


def projection(events: list) -> list[tuple]:
    """What the issue names, event by event: kind, token / unit ids, delay, sample count."""
    rows = []
    for e in events:
        if isinstance(e, (AsrText, TranslationText)):
            rows.append((e.kind, e.token_ids, e.source_ms))
        elif isinstance(e, SpeechChunk):
            rows.append((e.kind, e.unit_ids, e.source_ms, len(e.samples)))
        else:
            rows.append((e.kind, e.translation_ids, e.source_ms, e.num_samples))
    return rows


def speech(events: list) -> np.ndarray:
    chunks = [e.samples for e in events if isinstance(e, SpeechChunk)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


# ---- fixtures: one translator per segment size, one whole-input reference per (rate, segment) ----


@pytest.fixture(scope="module")
def translators(tiny_artifacts_dir) -> dict[int, Translator]:
    return {ms: Translator.from_artifacts(tiny_artifacts_dir, segment_ms=ms, policy=POLICY,
                                          deterministic=True) for ms in SEGMENTS_MS}


@pytest.fixture(scope="module")
def references(translators) -> dict[tuple[int, int], list]:
    return {(rate, ms): run(translators[ms], signal(rate), rate)
            for rate in RATES for ms in SEGMENTS_MS}


def test_references_have_structure(references):
    """The property is only worth something if the whole-input run emits a varied event stream."""
    for (rate, ms), events in references.items():
        kinds = [e.kind for e in events]
        assert kinds.count("end") == 1 and kinds[-1] == "end", (rate, ms)
        assert sum(len(e.token_ids) for e in events if e.kind == "asr") >= 3, (rate, ms)
        assert kinds.count("translation") >= 2, (rate, ms)
        assert speech(events).size > 0, (rate, ms)
        units = [u for e in events if e.kind == "speech" for u in e.unit_ids]
        assert len(set(units)) >= 2, (rate, ms)
        assert events[-1].source_ms == pytest.approx(1000 * SECONDS, abs=0.1)
    # different rates really go through different front ends yet give close (not equal) inputs
    assert len({tuple(map(tuple, projection(references[(r, 320)]))) for r in RATES}) >= 2


# ---- the property ------------------------------------------------------------------------------


@st.composite
def chunk_plans(draw) -> tuple[int, int, list[tuple[int, bool, bool]]]:
    """(rate, segment_ms, [(chunk samples, decode after?, float64?), ...]).

    Chunk sizes mix empty chunks, single samples and tiny chunks (sample-level boundaries), medium
    chunks (inside a 10 ms fbank hop up to a few segments) and huge ones (up to 10 s, past the end).
    """
    rate = draw(st.sampled_from(RATES))
    segment_ms = draw(st.sampled_from(SEGMENTS_MS))
    size = st.one_of(st.just(0), st.integers(1, 7), st.integers(8, rate // 4),
                     st.integers(rate // 4, int(MAX_CHUNK_S * rate)))
    plan = draw(st.lists(st.tuples(size, st.booleans(), st.booleans()), min_size=1, max_size=40))
    return rate, segment_ms, plan


@settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=chunk_plans())
def test_any_chunking_gives_the_whole_input_events(case, translators, references):
    rate, segment_ms, plan = case
    expected = references[(rate, segment_ms)]
    got = run(translators[segment_ms], signal(rate), rate, plan)
    assert projection(got) == projection(expected)
    np.testing.assert_array_equal(speech(got), speech(expected))
    assert got == expected  # every field, samples chunk by chunk (compute time excluded)


def test_sample_by_sample(translators, references):
    """The extreme chunking, one sample per call with a decode after each, over the first 0.7 s
    at 8 kHz (where a resampler, an fbank hop and an encoder hop all straddle every boundary)."""
    rate, head = 8000, int(0.7 * 8000)
    plan = [(1, True, False)] * head
    got = run(translators[160], signal(rate), rate, plan)
    assert got == references[(rate, 160)]


def test_interrupted_decodes_resume_exactly(translators, references):
    """``decode`` only after input_finished (everything in one final call) equals decoding as
    audio arrives: the policy's segment loop does not depend on when it is driven."""
    rate = 16000
    x = signal(rate)
    plan = [(1234, False, False)] * (x.size // 1234)
    assert run(translators[320], x, rate, plan) == references[(rate, 320)]


def test_end_of_stream_is_final(translators):
    """After the end, decode returns nothing however often it is called, and more audio is refused
    with a ValueError that says what to do."""
    translator, rate = translators[160], 16000
    stream = translator.create_stream()
    stream.accept_waveform(rate, signal(rate, 0.5))
    stream.input_finished()
    events = translator.decode(stream)
    assert isinstance(events[-1], EndOfStream)
    assert translator.decode(stream) == [] and translator.decode(stream) == []
    with pytest.raises(ValueError, match="reset"):
        stream.accept_waveform(rate, np.zeros(0, np.float32))
