"""Isolation (issue #7.4): streams sharing one translator never see each other.

Each stream gets a script of calls -- audio chunks of random sizes at its own sample rate, decodes
after some of them, a mid-stream ``reset`` (end of sentence), ``input_finished`` and a second
utterance after a reset, and refused calls (a NaN chunk, a changed sample rate). The scripts of
several streams are then executed interleaved in a random order through one translator, and in
threads at the same time; every stream must return exactly what its script returns when it runs
alone. A refused call must change nothing: the script without it gives the same events.

What would break it: any per-stream value cached on the translator or a stage (state buffers
reused across streams, a shared feature or resampler object, a zero state handed out by reference
and then written in place), or thread-unsafe stage calls.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest

from echostream.errors import AudioError
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.translator import Translator

POLICY = PolicyConfig(final_max_len=12)  # keeps the final decodes short
RATES = (16000, 48000, 8000, 44100)


def voice(seed: int, rate: int, seconds: float) -> np.ndarray:
    """A stream's audio, ``[n]`` float32: a chirp (up or down, seeded range) under a seeded
    syllable envelope, with a pause -- different streams emit different tokens."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    lo, hi = rng.uniform(100, 400), rng.uniform(1500, 3800)
    sweep = np.linspace(lo, hi, t.size) if seed % 2 else np.linspace(hi, lo, t.size)
    envelope = 0.3 + 0.25 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6))
    x = envelope * np.sin(2 * np.pi * np.cumsum(sweep) / rate)
    pause = rng.uniform(0.25, 0.5) * seconds
    x[(t > pause) & (t < pause + 0.3)] = 0.0
    return x.astype(np.float32)


# ---- scripts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One call on a stream: ``feed`` (samples ``[n]`` at ``rate``, then decode if ``decode``),
    ``reset``, ``finish`` (input_finished + decode), or ``bad`` (a call that must be refused)."""

    kind: str
    samples: np.ndarray | None = None
    rate: int = 0
    decode: bool = False


def make_script(seed: int, rate: int) -> list[Op]:
    """Utterance 1 (with a mid-stream reset and two refused calls) -> finish -> reset ->
    utterance 2 -> finish."""
    rng = np.random.default_rng(1000 + seed)
    ops: list[Op] = []
    for utterance, seconds in enumerate((rng.uniform(1.5, 2.5), rng.uniform(0.8, 1.5))):
        x, pos = voice(seed * 10 + utterance, rate, seconds), 0
        reset_at = int(0.5 * x.size) if utterance == 0 else -1
        bad_at = {int(0.3 * x.size), int(0.7 * x.size)} if utterance == 0 else set()
        while pos < x.size:
            n = int(rng.choice([0, 1, rng.integers(2, 400), rng.integers(400, rate)]))
            ops.append(Op("feed", x[pos:pos + n], rate, decode=bool(rng.random() < 0.7)))
            if pos < reset_at <= pos + n:
                ops.append(Op("reset"))
            if any(pos < b <= pos + n for b in bad_at):
                ops.append(Op("bad", *_bad_chunk(rng, rate)))
            pos += n
        ops.append(Op("finish"))
        if utterance == 0:
            ops.append(Op("reset"))
    return ops


def _bad_chunk(rng: np.random.Generator, rate: int) -> tuple[np.ndarray, int]:
    """A NaN chunk at the right rate, or a good chunk at a changed rate."""
    if rng.random() < 0.5:
        return np.array([0.1, np.nan, 0.2], np.float32), rate
    return np.zeros(160, np.float32), rate // 2


def apply(translator: Translator, stream, op: Op) -> list:
    """Run one op; returns its outputs (events, or the refusal as ``("refused", type)``)."""
    if op.kind == "feed":
        stream.accept_waveform(op.rate, op.samples)
        return translator.decode(stream) if op.decode else []
    if op.kind == "reset":
        stream.reset()
        return []
    if op.kind == "finish":
        stream.input_finished()
        return translator.decode(stream)
    with pytest.raises((AudioError, ValueError)) as refused:
        stream.accept_waveform(op.rate, op.samples)
    return [("refused", type(refused.value).__name__)]


def alone(translator: Translator, script: list[Op]) -> list:
    stream = translator.create_stream()
    return [out for op in script for out in apply(translator, stream, op)]


# ---- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def translator(tiny_artifacts_dir) -> Translator:
    return Translator.from_artifacts(tiny_artifacts_dir, segment_ms=320, policy=POLICY,
                                     deterministic=True)


@pytest.fixture(scope="module")
def scripts() -> list[list[Op]]:
    return [make_script(seed, rate) for seed, rate in enumerate(RATES)]


@pytest.fixture(scope="module")
def solo(translator, scripts) -> list[list]:
    return [alone(translator, s) for s in scripts]


def test_scripts_exercise_the_runtime(solo):
    """Each stream alone: two utterances, refusals recorded, and streams differ from each other
    (so that a mix-up between streams would show)."""
    for outputs in solo:
        kinds = [o.kind if hasattr(o, "kind") else o[0] for o in outputs]
        assert kinds.count("end") == 2 and kinds.count("refused") == 2
        assert kinds.count("translation") >= 2 and kinds.count("speech") >= 1
    asr = {tuple(t for e in outputs if getattr(e, "kind", None) == "asr" for t in e.token_ids)
           for outputs in solo}
    assert len(asr) == len(solo), "the streams' audio should give different recognitions"


@pytest.mark.parametrize("seed", range(4))
def test_interleaved_equals_alone(translator, scripts, solo, seed):
    rng = np.random.default_rng(seed)
    streams = [translator.create_stream() for _ in scripts]
    got: list[list] = [[] for _ in scripts]
    cursor = [0] * len(scripts)
    while any(c < len(s) for c, s in zip(cursor, scripts)):
        i = int(rng.choice([k for k, s in enumerate(scripts) if cursor[k] < len(s)]))
        got[i] += apply(translator, streams[i], scripts[i][cursor[i]])
        cursor[i] += 1
    for i, expected in enumerate(solo):
        assert got[i] == expected, f"stream {i} changed by its neighbours (schedule seed {seed})"


def test_refused_calls_change_nothing(translator, scripts, solo):
    for script, expected in zip(scripts, solo):
        clean = alone(translator, [op for op in script if op.kind != "bad"])
        assert clean == [o for o in expected if not isinstance(o, tuple)]


def test_concurrent_threads_equal_alone(translator, scripts, solo):
    """One thread per stream, all released at once: ONNX Runtime sessions are shared, streams
    are not."""
    got: list[list | BaseException] = [[] for _ in scripts]
    start = threading.Barrier(len(scripts))

    def worker(i: int) -> None:
        try:
            stream = translator.create_stream()
            start.wait()
            got[i] = [out for op in scripts[i] for out in apply(translator, stream, op)]
        except BaseException as exc:  # surfaced below with the stream's index
            got[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(scripts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, expected in enumerate(solo):
        assert not isinstance(got[i], BaseException), f"stream {i} raised {got[i]!r}"
        assert got[i] == expected, f"stream {i} differs when run concurrently"


def test_streams_share_no_state_memory(translator):
    """Fresh streams share only read-only state arrays (the backend's one zero state): nothing
    writable aliases another stream's buffers, and stepping one stream leaves another's state at
    zero."""
    a, b = translator.create_stream(), translator.create_stream()

    def arrays(stream):
        states = {**stream.states, "mt_decoder": stream.policy.mt.state}
        return [v for s in states.values() for v in s.values()]

    for x in arrays(a):
        shared = [y for y in arrays(b) if np.shares_memory(x, y)]
        assert all(not x.flags.writeable and not y.flags.writeable for y in shared)
        if shared:
            with pytest.raises(ValueError, match="read-only"):
                x[...] = 1
    a.accept_waveform(16000, voice(0, 16000, 1.5))
    translator.decode(a)
    assert any(np.any(x != 0) for x in arrays(a))
    assert all(not np.any(y) for y in arrays(b)), "stepping one stream wrote into another"
