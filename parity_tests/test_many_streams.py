"""Many streams on one translator (issue 12): ``decode_streams`` batches every stage call over the
streams that need it, and every stream gets exactly the events it gets decoded alone.

Property (hypothesis, derandomized): a random arrival schedule of 1-16 streams with different
audio (seeds, lengths) and input rates, joining at different ticks, fed in random chunk sizes,
some reset mid-stream, some finishing early, others later, all decoded together with one
``decode_streams`` per tick; each stream replays the same operations alone with ``decode``.
Token and unit ids, delays and sample counts must be identical, samples within 1e-5. Checked on
ONNX Runtime (several segment sizes) and on the PyTorch reference backend.

Why it can fail: batching stacks states of streams at different positions (a shared counter or a
mask built from one stream's position would leak), the scheduler splits results back by row (an
off-by-one gives a stream its neighbour's tokens), and streams join, reset and leave between
rounds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from echostream.errors import AudioError
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.scheduler import stack_rows
from echostream.runtime.translator import Translator

from test_chunking_invariance import assert_same_events
from test_translator import bursts

POLICY = PolicyConfig(final_max_len=10)
RATES = (16000, 8000, 44100)


@dataclass
class Plan:
    """One stream's life: audio, when it joins, its chunks, and what happens after which chunk."""

    audio: np.ndarray
    rate: int
    join: int  # tick of its first chunk
    chunks: list[int]
    reset_after: int | None = None  # chunk index after which reset() is called (mid-stream)
    events: list = field(default_factory=list)


@st.composite
def schedules(draw, max_streams: int = 16):
    n = draw(st.integers(1, max_streams))
    plans = []
    for i in range(n):
        rate = draw(st.sampled_from(RATES))
        seconds = draw(st.floats(0.3, 2.5))
        audio = bursts(seconds, seed=draw(st.integers(0, 50)), rate=rate)
        pieces = draw(st.integers(1, 6))
        cuts = sorted(draw(st.lists(st.integers(0, len(audio)), min_size=pieces - 1,
                                    max_size=pieces - 1)))
        bounds = [0, *cuts, len(audio)]
        chunks = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        reset = draw(st.one_of(st.none(), st.integers(0, len(chunks) - 1)))
        plans.append(Plan(audio, rate, draw(st.integers(0, 4)), chunks,
                          reset if reset is not None and reset < len(chunks) - 1 else None))
    return plans


def operations(plan: Plan) -> dict[int, list[tuple]]:
    """tick -> the stream's operations at that tick: ("feed", a, b), ("reset",), ("finish",)."""
    ops: dict[int, list[tuple]] = {}
    pos = 0
    for k, size in enumerate(plan.chunks):
        tick = plan.join + k
        ops.setdefault(tick, []).append(("feed", pos, pos + size))
        pos += size
        if plan.reset_after == k:
            ops[tick].append(("reset",))
    ops.setdefault(plan.join + len(plan.chunks) - 1, []).append(("finish",))
    return ops


def apply(stream, plan: Plan, op: tuple) -> None:
    if op[0] == "feed":
        stream.accept_waveform(plan.rate, plan.audio[op[1]:op[2]])
    elif op[0] == "reset":
        stream.reset()
    else:
        stream.input_finished()


def solo(translator: Translator, plan: Plan) -> list:
    """The stream alone: the same operations, ``decode`` after each tick."""
    stream, events = translator.create_stream(), []
    ops = operations(plan)
    for tick in sorted(ops):
        for op in ops[tick]:
            if op[0] == "reset":
                events += translator.decode(stream)  # decode what arrived before the reset
            apply(stream, plan, op)
        events += translator.decode(stream)
    return events


def together(translator: Translator, plans: list[Plan]) -> list[list]:
    """Every stream through ``decode_streams``, one call per tick over the streams active then."""
    streams = [translator.create_stream() for _ in plans]
    ops = [operations(p) for p in plans]
    events: list[list] = [[] for _ in plans]
    last = max(max(o) for o in ops)
    for tick in range(last + 1):
        active = [i for i, o in enumerate(ops) if tick in o]
        for i in active:
            for op in ops[i][tick]:
                if op[0] == "reset":  # decode what arrived before the reset, batched with others
                    events[i] += translator.decode_streams([streams[i]])[0]
                apply(streams[i], plans[i], op)
        for i, new in zip(active, translator.decode_streams([streams[i] for i in active])):
            events[i] += new
    return events


@pytest.fixture(scope="module")
def translators(tiny_artifacts_dir):
    out = {ms: Translator.from_artifacts(tiny_artifacts_dir, segment_ms=ms, policy=POLICY,
                                         deterministic=True) for ms in (160, 320, 640)}
    out["torch"] = Translator.from_artifacts(tiny_artifacts_dir, backend="torch", policy=POLICY)
    return out


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plans=schedules(), segment=st.sampled_from([160, 320, 640]))
def test_random_schedules_equal_solo_decoding_on_onnxruntime(translators, plans, segment):
    translator = translators[segment]
    batched = together(translator, plans)
    for plan, events in zip(plans, batched):
        assert_same_events(events, solo(translator, plan))


@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plans=schedules(max_streams=5))
def test_random_schedules_equal_solo_decoding_on_torch(translators, plans):
    translator = translators["torch"]
    batched = together(translator, plans)
    for plan, events in zip(plans, batched):
        assert_same_events(events, solo(translator, plan))


def test_stacking_rows_of_one_batch_is_a_view_and_anything_else_a_copy():
    batch = np.arange(5 * 3, dtype=np.float32).reshape(5, 3).copy()  # owns its data, as outputs do
    rows = [batch[i:i + 1] for i in range(5)]
    for chosen in ([1, 2, 3], [0, 1, 2, 3, 4], [4]):
        stacked = stack_rows([rows[i] for i in chosen])
        assert np.shares_memory(stacked, batch) and stacked.base is batch
        np.testing.assert_array_equal(stacked, batch[chosen])
    for chosen in ([1, 3], [2, 1], [0, 0]):  # a gap, another order, a row twice: copied
        stacked = stack_rows([rows[i] for i in chosen])
        assert not np.shares_memory(stacked, batch)
        np.testing.assert_array_equal(stacked, batch[chosen])


def test_a_context_is_stacked_once_while_the_same_streams_write(translators):
    """The MT decoder's context (the source K/V of ``mt_source``) stays put while streams write
    token after token: one decode_streams stacks it once per set of streams, not once per token."""
    translator = translators[320]
    stage = translator.stages["mt_decoder"]
    stacked, calls = [], []
    original_stack, original_run = stage.stack_states, stage.run

    def stack(states):
        out = original_stack(states)
        if "cross_keys" in states[0]:
            stacked.append(len(states))
        return out

    def run(inputs, state=None, context=None):
        calls.append(int(inputs["x"].shape[0]))
        return original_run(inputs, state, context)

    stage.stack_states, stage.run = stack, run
    try:
        streams = [translator.create_stream() for _ in range(4)]
        for i, s in enumerate(streams):
            s.accept_waveform(16000, bursts(1.5, seed=i))
            s.input_finished()
        translator.decode_streams(streams)
    finally:
        del stage.stack_states, stage.run
    batched = [n for n in calls if n > 1]
    assert len(batched) > 2 and 0 < len(stacked) < len(batched)


def test_batched_calls_really_batch(translators):
    """16 streams in one decode_streams: stage calls run with B > 1 (not one stream at a time)."""
    translator = translators[320]
    seen: list[int] = []
    stage = translator.stages["encoder"]
    original = stage.run

    def spy(inputs, state=None, context=None):
        seen.append(int(inputs["x"].shape[0]))
        return original(inputs, state, context)

    stage.run = spy
    try:
        streams = [translator.create_stream() for _ in range(16)]
        for i, s in enumerate(streams):
            s.accept_waveform(16000, bursts(1.0, seed=i))
        translator.decode_streams(streams)
    finally:
        del stage.run
    assert max(seen) == 16


def test_a_refused_stream_does_not_disturb_the_others(translators):
    translator = translators[320]
    audio = [bursts(1.5, seed=s) for s in range(3)]
    streams = [translator.create_stream() for _ in audio]
    for s, a in zip(streams, audio):
        s.accept_waveform(16000, a[:8000])
    with pytest.raises(AudioError, match="NaN"):
        streams[1].accept_waveform(16000, np.array([0.0, np.nan], np.float32))
    first = translator.decode_streams(streams)
    for s, a in zip(streams, audio):
        s.accept_waveform(16000, a[8000:])
        s.input_finished()
    second = translator.decode_streams(streams)
    for i, a in enumerate(audio):
        plan = Plan(a, 16000, 0, [8000, len(a) - 8000])
        assert_same_events(first[i] + second[i], solo(translator, plan))


def test_decode_streams_refuses_foreign_and_repeated_streams(translators):
    a = translators[320]
    stream = a.create_stream()
    with pytest.raises(ValueError, match="same stream twice"):
        a.decode_streams([stream, stream])
    with pytest.raises(ValueError, match="another Translator"):
        translators[160].decode_streams([stream])


def test_device_state_backend_batches_streams_exactly(tiny_artifacts_dir):
    """The IOBinding backend (device states; its CPU provider here) stacks and splits states
    of its own: streams decoded together equal each decoded alone."""
    translator = Translator.from_artifacts(tiny_artifacts_dir, backend="onnxruntime-cuda",
                                           device="cpu", policy=POLICY, deterministic=True)
    plans = [Plan(bursts(1.2, seed=s), 16000, s % 2, [6000, 13200]) for s in range(3)]
    for plan, events in zip(plans, together(translator, plans)):
        assert_same_events(events, solo(translator, plan))
