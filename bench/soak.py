"""Soak: an hour of speech with pauses through one endless stream, endpointing on.

A meeting is one stream that lasts hours and nobody watches the device, so nothing may grow and
the runtime must find the sentences itself. This script feeds ``--hours`` (or ``--minutes``) of
sentences with pauses between them through one :class:`~echostream.runtime.stream.Stream` in
microphone-sized chunks (``--chunk-ms``), decoding after every chunk and never calling ``reset``:
the translator's endpoint rules (``runtime/endpoint.py``) end every sentence. At the end of the
audio, ``input_finished`` and a last decode must give ``EndOfStream``.

Audio (``--speech``): ``espeak`` (default; espeak-ng reading 24 English sentences of 2-9 s, the
voices of ``--voices`` taking turns, speaking rates 150-175 words/min, resampled by the runtime
from espeak-ng's 22.05 kHz), ``synthetic`` (gliding harmonics and a chirp, 4-12 s, at
``--sample-rate``), or ``--audio FILE`` looped. Every sentence is followed by 1.8-2.6 s of digital
silence (seeded), and the pool is made up front and cycled, so the soak itself allocates nothing
while it runs and RSS shows the runtime alone.

``--silence-stand-in``: the seeded presets have random weights, and a random ASR head emits its
prior on silence too, so no pause would ever show in its CTC output; the flag turns on the
endpoint's energy gate at digital silence (``EndpointConfig.silence_floor``, translate's
``--endpoint-silence-floor -15``): every encoder frame whose audio is digital silence reads as a
certain blank, as a trained head's output would; every graph's output stays the graph's. Trained
checkpoints need no gate on clean audio.

Every ``--interval-s`` seconds of *audio* (default 60) it records the process RSS, the per-segment
compute time (accept + decode wall time of the chunks that completed policy segments, divided by
the segments), live Python objects, the bytes of every state tensor, the buffered fbank frames,
pending synthesiser units and the sentence ends; state shapes are checked after every chunk. The
verdicts, stored in ``--out`` and printed:

- ``state``: no state tensor ever changed dtype or shape, no buffer grows (the largest buffered
  frame count and pending synthesiser units of the second half are no larger than in the first),
  and live Python objects grow by at most 100 after the warm-up (a leak of one object a segment or
  a sentence shows here long before it shows in RSS);
- ``rss``: the peak RSS after the warm-up is < ``--max-rss-growth`` (5 %) above the RSS at its end
  (warm-up: the first 10 % of the audio, at most 5 minutes, and at least one endpoint);
- ``time``: compute does not grow: the pool of sentences comes back every cycle (the same
  samples), so each sentence's cost at its last occurrence is compared with its first after the
  warm-up (the sentence, its pause and the flush its endpoint caused); the median of these ratios
  is at most ``--max-time-ratio`` (1.1). Compute is the process's CPU time (every thread), so a
  neighbour's load on a shared machine does not pass for a trend. The last-quarter / first-quarter
  ratio of the per-interval segment medians (CPU and wall) is reported beside it; it is not the
  verdict, because with random weights it follows what the model happens to write in each stretch;
- ``endpoints``: the endpoints are the inserted pauses: an endpoint is *right* when it was decided
  inside a pause (from the pause's first silent sample to one segment after its last), at most one
  per pause; precision (right / endpoints) and recall (pauses with an endpoint / pauses) >=
  ``--min-endpoint-score`` (0.95);
- ``capacity``: no sentence was cut by the stage capacity (``*_capacity`` endpoints: 0).

Usage::

    python bench/soak.py --artifacts engines/echostream --hours 1 --silence-stand-in \
        --out bench/out/soak-echostream.json
    python bench/soak.py --artifacts engines/tiny --minutes 2 --interval-s 10 --silence-stand-in \
        --verdicts state,rss,endpoints,capacity

Writes ``--out`` (JSON: settings, one record per interval, every endpoint, verdicts) and a plot
beside it (RSS and per-segment time against audio time). Exit status 1 if a requested verdict
fails. Needs no torch (runtime only); ``psutil`` and ``matplotlib`` are optional.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from echostream.contract import UNIT_SHORT_STAGE

VERDICTS = ("state", "rss", "time", "endpoints", "capacity")
WARMUP_FRACTION, WARMUP_MAX_S = 0.10, 300.0
PAUSE_S = (1.8, 2.6)  # the endpoint rule needs 1 s of blank after text, plus segment look-ahead
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3")
TEXTS = (
    "The meeting will start again in five minutes.",
    "Please open the report on page twelve.",
    "We measured the latency of every stage on the new device.",
    "Nobody expected the storm to arrive so early in the season.",
    "The library closes at eight on weekdays and at noon on Saturdays.",
    "Our team has translated the first lecture into three languages.",
    "If the signal drops, the stream keeps its state and waits.",
    "Thank you all for coming, and welcome to the second session.",
    "The train to the airport leaves from platform four.",
    "She asked whether the results could be reproduced on a laptop.",
    "In the afternoon we will visit the old harbour and the museum.",
    "A good interpreter listens, waits for the verb, and then speaks.",
    "The committee approved the budget after a long discussion about the roads.",
    "Can you repeat the last question, please?",
    "The river was higher than anyone in the village could remember.",
    "Every engine was checked against the reference before the release.",
    "Lunch will be served in the main hall at half past twelve.",
    "He explained the method slowly, one step at a time.",
    "The children planted trees along the new road to the school.",
    "Most of the questions were about memory and power on small devices.",
    "We will take a short break and continue with the next speaker.",
    "The weather tomorrow should be dry, with a light wind from the west.",
    "After the vote, the chair thanked the members and closed the meeting.",
    "Good morning everyone.",
)


# ---- audio sources ------------------------------------------------------------------------------


@dataclass
class Piece:
    """One sentence of the soak's audio: ``speech`` ``[n]`` float32 at ``rate``, then
    ``pause_s`` seconds of digital silence."""

    speech: np.ndarray
    rate: int
    pause_s: float
    label: str = ""


def trim_silence(samples: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """``samples`` without leading and trailing near-silence (so the pause starts where speech
    ends)."""
    loud = np.flatnonzero(np.abs(samples) > floor)
    return samples[loud[0]:loud[-1] + 1] if loud.size else samples[:0]


def espeak_pool(voices: tuple[str, ...], seed: int) -> list[Piece]:
    """:data:`TEXTS` read by espeak-ng, voices taking turns, rates 150-175 words/min."""
    import soundfile as sf

    from echostream.bench.speech import synthesize_speech

    rng = np.random.default_rng([seed, 1])
    pieces = []
    with tempfile.TemporaryDirectory(prefix="echostream-soak-") as tmp:
        for i, text in enumerate(TEXTS):
            voice, wpm = voices[i % len(voices)], int(rng.integers(150, 176))
            info = synthesize_speech(Path(tmp) / f"{i}.wav", text, voice, wpm)
            samples, rate = sf.read(info["path"], dtype="float32")
            pieces.append(Piece(trim_silence(samples), rate, float(rng.uniform(*PAUSE_S)),
                                f"{voice}: {text}"))
    return pieces


def synthetic_speech(index: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Synthetic sentence ``index``: ``[n]`` float32 in [-0.6, 0.6], 4-12 s of "speech" (harmonics
    of a 100-200 Hz gliding pitch gated into ~4 Hz syllables, plus a quieter 200-3000 Hz chirp so
    that random-weight models emit tokens too). Deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    t = np.arange(int(rng.uniform(4.0, 12.0) * sample_rate)) / sample_rate
    f0 = 150 + 50 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t), 0, None) ** 0.5
    sweep = np.linspace(200.0, 3000.0, t.size) if rng.random() < 0.5 else np.linspace(3000.0, 200.0, t.size)
    chirp = np.sin(2 * np.pi * np.cumsum(sweep) / sample_rate)
    return np.clip(0.2 * syllables * voice + 0.15 * chirp, -0.6, 0.6).astype(np.float32)


def synthetic_pool(sample_rate: int, seed: int, size: int = 21) -> list[Piece]:
    rng = np.random.default_rng([seed, 2])
    return [Piece(synthetic_speech(i, sample_rate, seed), sample_rate,
                  float(rng.uniform(*PAUSE_S)), f"synthetic {i}") for i in range(size)]


def file_pool(path: str) -> list[Piece]:
    from echostream.runtime.audio import read_audio

    samples, rate = read_audio(path)
    return [Piece(samples, rate, float(np.mean(PAUSE_S)), Path(path).name)]


def endless(pool: list[Piece]) -> Iterator[Piece]:
    while True:
        yield from pool


# ---- probes ------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process (psutil, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def host_states(stream: Any) -> dict[str, dict[str, np.ndarray]]:
    """Every model state a stream holds, as host arrays: ``{"encoder": {"memory": [1,NL,M,D], ...},
    ..., "mt_decoder": {...}}`` (the MT decoder's kept state included)."""
    states = dict(stream.states)
    states["mt_decoder"] = stream.policy.mt.state
    stages = stream.translator.stages
    return {name: stages[name].state_to_host(state) for name, state in states.items()}


def state_signature(stream: Any) -> dict[str, list]:
    """``"stage.tensor" -> [dtype, *shape]`` of every state tensor (what must never change).

    A sentence's unit-decoder caches start as the short graph's and grow once into the full
    graph's (``unit_decoder_short``): both fixed, so a short state signs as the full one."""
    shapes = _short_unit_as_full(stream)
    return {f"{stage}.{name}": [str(a.dtype), *shapes.get((stage, name), a.shape)]
            for stage, arrays in host_states(stream).items() for name, a in arrays.items()}


def _short_unit_as_full(stream: Any) -> dict[tuple[str, str], tuple[int, ...]]:
    """The full graph's shapes for the unit-decoder state, when it is exactly the short graph's."""
    stages = stream.translator.stages
    if UNIT_SHORT_STAGE not in stages:
        return {}
    state = stages[UNIT_SHORT_STAGE].state_to_host(stream.states["unit_decoder"])
    short = {s.name: s.concrete_shape(1) for s in stages[UNIT_SHORT_STAGE].contract.states}
    if any(tuple(state[name].shape) != shape for name, shape in short.items()):
        return {}
    return {("unit_decoder", s.name): s.concrete_shape(1)
            for s in stages["unit_decoder"].contract.states}


def buffered_frames(stream: Any) -> int:
    """Fbank frames the stream still holds (produced, not yet discarded)."""
    return stream.features.num_frames - stream.features.first_frame


# ---- the soak -----------------------------------------------------------------------------------


@dataclass
class Interval:
    """One record: what happened during ``--interval-s`` seconds of audio."""

    audio_s: float  # audio fed so far (end of this interval)
    wall_s: float  # wall time since the start
    rss_mib: float
    py_objects: int  # objects the garbage collector tracks (this script's records excluded)
    segments: int
    seg_ms_median: float | None
    seg_ms_p95: float | None
    seg_ms_max: float | None
    seg_cpu_ms_median: float | None  # process CPU time (all threads) per segment
    rtf: float  # compute / audio within this interval
    sentences: int  # EndOfSentence events within this interval
    capacity_cuts: int  # of which the stage capacity forced
    state_bytes: int
    state_changed: bool  # after some chunk, a state tensor's dtype/shape differed from the start
    buffered_frames_max: int
    pending_units_max: int
    asr_tokens: int
    translation_tokens: int
    speech_samples: int


@dataclass
class _Window:
    """Accumulators of the current interval."""

    seg_ms: list[float] = field(default_factory=list)
    seg_cpu_ms: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    sentences: int = 0
    capacity: int = 0
    state_changed: bool = False
    buffered_max: int = 0
    pending_max: int = 0
    asr: int = 0
    tokens: int = 0
    samples: int = 0


class Soak:
    """Drives one endless stream of ``translator`` (endpointing on) and records an
    :class:`Interval` per ``interval_s`` of audio, every pause it inserted and every endpoint."""

    def __init__(self, translator: Any, chunk_ms: int, interval_s: float, log=print):
        if translator.endpoint is None:
            raise ValueError("the soak needs a translator with endpointing on")
        self.translator, self.chunk_ms, self.interval_s, self.log = translator, chunk_ms, interval_s, log
        self.stream = translator.create_stream()
        self.signature = state_signature(self.stream)
        self.records: list[Interval] = []
        self.pauses: list[tuple[float, float]] = []  # (first silent s, end s) of every pause
        self.endpoints: list[dict[str, Any]] = []  # every EndOfSentence: reason, source_s
        self.sentences: list[dict[str, Any]] = []  # every whole piece fed: its pool item, CPU time
        self.audio_s = 0.0
        self._start = time.perf_counter()
        self._window = _Window()
        self._pending_s = 0.0  # compute of chunks that completed no segment yet
        self._pending_cpu_s = 0.0

    def run(self, pieces: Iterator[Piece], total_s: float) -> list[Interval]:
        """Feed pieces until ``total_s`` seconds of audio have gone in, then finish the stream."""
        for piece in pieces:
            began, cpu0 = self.audio_s, time.process_time()
            self._feed(piece.speech, piece.rate, total_s)
            if self.audio_s >= total_s:
                break
            start = self.audio_s
            self._feed(np.zeros(int(piece.pause_s * piece.rate), np.float32), piece.rate, total_s)
            self.pauses.append((start, self.audio_s))
            if self.audio_s >= total_s:
                break
            # The sentence, its pause and the flush its endpoint caused; the same pool item (the
            # same object, the same samples) comes back every cycle, so its costs are comparable.
            self.sentences.append({"item": id(piece), "label": piece.label, "start_s": round(began, 3),
                                   "cpu_s": round(time.process_time() - cpu0, 4)})
        self._finish()
        if not self.records or self.audio_s - self.records[-1].audio_s > 1e-3:  # a partial interval
            self._record()
        return self.records

    def _feed(self, samples: np.ndarray, rate: int, total_s: float) -> None:
        step = max(1, rate * self.chunk_ms // 1000)
        for start in range(0, samples.size, step):
            self._feed_chunk(samples[start:start + step], rate)
            if self.audio_s >= total_s:
                break

    def _feed_chunk(self, chunk: np.ndarray, rate: int) -> None:
        stream, before = self.stream, self._encoder_calls()
        t0, c0 = time.perf_counter(), time.process_time()
        stream.accept_waveform(rate, chunk)
        events = self.translator.decode(stream)
        spent, cpu = time.perf_counter() - t0, time.process_time() - c0
        self._count(events, spent)
        segments = (self._encoder_calls() - before) // self.translator.steps_per_segment
        if segments:
            self._window.seg_ms += [1000.0 * (spent + self._pending_s) / segments] * segments
            self._window.seg_cpu_ms += [1000.0 * (cpu + self._pending_cpu_s) / segments] * segments
            self._pending_s = self._pending_cpu_s = 0.0
        else:
            self._pending_s += spent
            self._pending_cpu_s += cpu
        w = self._window  # probes after the timed region: they cost the stream nothing
        w.state_changed |= state_signature(stream) != self.signature
        w.buffered_max = max(w.buffered_max, buffered_frames(stream))
        w.pending_max = max(w.pending_max, stream.synthesizer.pending_units)
        previous = self.audio_s
        self.audio_s += chunk.size / rate
        if math.floor(self.audio_s / self.interval_s) > math.floor(previous / self.interval_s):
            self._record()

    def _encoder_calls(self) -> int:
        """Encoder steps of the whole stream (the sentence's own count restarts at endpoints)."""
        return self.stream.clock.calls.get("encoder", 0)

    def _finish(self) -> None:
        t0 = time.perf_counter()
        self.stream.input_finished()
        events = self.translator.decode(self.stream)
        self._count(events, time.perf_counter() - t0)
        if not self.stream.finished or not events or events[-1].kind != "end":
            raise RuntimeError("the end of the input did not give EndOfStream")

    def _count(self, events: list, spent: float) -> None:
        w = self._window
        w.compute_s += spent
        for e in events:
            if e.kind == "asr":
                w.asr += len(e.token_ids)
            elif e.kind == "translation":
                w.tokens += len(e.token_ids)
            elif e.kind == "speech":
                w.samples += len(e.samples)
            elif e.kind == "end_of_sentence":
                w.sentences += 1
                w.capacity += e.capacity
                self.endpoints.append({"reason": e.reason, "source_s": round(e.source_ms / 1e3, 3),
                                       "start_s": round(e.start_ms / 1e3, 3)})

    def _record(self) -> None:
        w = self._window
        seg = np.asarray(w.seg_ms) if w.seg_ms else None
        audio_in_window = self.audio_s - (self.records[-1].audio_s if self.records else 0.0)
        timing = {"seg_ms_median": None, "seg_ms_p95": None, "seg_ms_max": None,
                  "seg_cpu_ms_median": None}
        if seg is not None:
            timing = {"seg_ms_median": round(float(np.median(seg)), 3),
                      "seg_ms_p95": round(float(np.percentile(seg, 95)), 3),
                      "seg_ms_max": round(float(seg.max()), 3),
                      "seg_cpu_ms_median": round(float(np.median(w.seg_cpu_ms)), 3)}
        states = host_states(self.stream)
        changed = w.state_changed or state_signature(self.stream) != self.signature
        # Memory last, after everything above has allocated what it needs; the soak's own records
        # (intervals, pauses, endpoints) are not the runtime's.
        rss = rss_bytes()
        objects = len(gc.get_objects()) - len(self.records) - len(self.endpoints) - len(self.pauses)
        record = Interval(
            audio_s=round(self.audio_s, 3), wall_s=round(time.perf_counter() - self._start, 3),
            rss_mib=round(rss / 2**20, 2), py_objects=objects, segments=len(w.seg_ms), **timing,
            rtf=round(w.compute_s / max(audio_in_window, 1e-9), 4), sentences=w.sentences,
            capacity_cuts=w.capacity,
            state_bytes=sum(a.nbytes for arrays in states.values() for a in arrays.values()),
            state_changed=changed, buffered_frames_max=w.buffered_max,
            pending_units_max=w.pending_max, asr_tokens=w.asr, translation_tokens=w.tokens,
            speech_samples=w.samples,
        )
        self.records.append(record)
        self._window = _Window()
        self.log(f"[{record.audio_s / 60:7.2f} min audio | {record.wall_s:8.1f} s wall] "
                 f"RSS {record.rss_mib:8.1f} MiB  segment {record.seg_ms_median} ms (p95 "
                 f"{record.seg_ms_p95}, CPU {record.seg_cpu_ms_median})  RTF {record.rtf:.3f}  sentences {record.sentences}  "
                 f"objects {record.py_objects}")


# ---- verdicts -----------------------------------------------------------------------------------


def warmup_count(records: list[Interval]) -> int:
    """Intervals that count as warm-up: the first 10 % of the audio (at most 5 minutes), and at
    least until one sentence has ended; >= 1."""
    if not records:
        return 0
    limit = min(WARMUP_FRACTION * records[-1].audio_s, WARMUP_MAX_S)
    by_audio = sum(r.audio_s <= limit for r in records)
    ends = np.cumsum([r.sentences for r in records])
    by_sentences = int(np.searchsorted(ends, 1)) + 1  # first record with a sentence end
    return min(len(records), max(1, by_audio, by_sentences))


def endpoint_scores(pauses: list[tuple[float, float]], endpoints: list[dict[str, Any]],
                    grace_s: float) -> dict[str, Any]:
    """Precision and recall of the ``pause`` endpoints against the inserted pauses: an endpoint is
    right when decided within ``[pause start, pause end + grace_s]`` of a pause not matched yet."""
    decided = [e["source_s"] for e in endpoints if e["reason"] == "pause"]
    matched: set[int] = set()
    right = 0
    for t in decided:
        hit = next((i for i, (a, b) in enumerate(pauses) if a <= t <= b + grace_s), None)
        if hit is not None and hit not in matched:
            matched.add(hit)
            right += 1
    precision = right / len(decided) if decided else 0.0
    recall = len(matched) / len(pauses) if pauses else 0.0
    missed = [round(a, 3) for i, (a, _) in enumerate(pauses) if i not in matched]
    return {"pauses": len(pauses), "endpoints": len(decided), "right": right,
            "precision": round(precision, 4), "recall": round(recall, 4),
            "missed_pauses_s": missed[:20]}


def _flatness(medians: list[float | None], limit: float) -> dict[str, Any]:
    """Median of the last quarter of ``medians`` over the median of the first quarter."""
    timed = [m for m in medians if m is not None]
    quarter = max(1, len(timed) // 4)
    early, late = float(np.median(timed[:quarter])), float(np.median(timed[-quarter:]))
    ratio = late / early
    return {"ok": ratio <= limit, "first_quarter_ms": round(early, 3),
            "last_quarter_ms": round(late, 3), "ratio": round(ratio, 4), "limit": limit}


def repeat_ratio(sentences: list[dict[str, Any]], after_s: float, limit: float) -> dict[str, Any]:
    """CPU time of the same sentence at its last occurrence over its first after ``after_s``
    seconds of audio, median over the sentences that came back: the same samples through the
    same fixed-shape graphs cost the same at minute 60 as at minute 5 unless something grows."""
    seen: dict[int, list[dict[str, Any]]] = {}
    for s in sentences:
        if s["start_s"] >= after_s:
            seen.setdefault(s["item"], []).append(s)
    pairs = [(runs[0], runs[-1]) for runs in seen.values() if len(runs) >= 2]
    if not pairs:
        return {"ok": False, "why": "no sentence came back after the warm-up: stream at least two "
                                    "cycles of the pool (longer --minutes)"}
    ratios = sorted(last["cpu_s"] / first["cpu_s"] for first, last in pairs if first["cpu_s"] > 0)
    ratio = float(np.median(ratios))
    gap = float(np.median([last["start_s"] - first["start_s"] for first, last in pairs]))
    return {"ok": ratio <= limit, "ratio": round(ratio, 4), "limit": limit,
            "sentences_compared": len(ratios), "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
            "median_gap_s": round(gap, 1),
            "measure": "process CPU time of the same sentence (+ its pause and flush), last / first"}


def verdicts(records: list[Interval], pauses: list[tuple[float, float]] = (),
             endpoints: list[dict[str, Any]] = (), grace_s: float = 0.32,
             max_rss_growth: float = 0.05, max_time_ratio: float = 1.1,
             min_endpoint_score: float = 0.95, max_new_objects: int = 100,
             sentences: list[dict[str, Any]] = ()) -> dict[str, dict[str, Any]]:
    """The verdicts (see the module docstring), each ``{"ok": bool, ...numbers}``."""
    warm = warmup_count(records)
    after = records[warm:]
    half = len(records) // 2
    first, second = records[:max(half, 1)], records[half:] or records
    new_objects = max(r.py_objects for r in records[warm - 1:]) - records[warm - 1].py_objects
    state = {
        "ok": not any(r.state_changed for r in records)
              and max(r.buffered_frames_max for r in second) <= max(r.buffered_frames_max for r in first)
              and max(r.pending_units_max for r in second) <= max(r.pending_units_max for r in first)
              and new_objects <= max_new_objects,
        "state_changed": any(r.state_changed for r in records),
        "new_py_objects_after_warmup": new_objects,
        "state_bytes": sorted({r.state_bytes for r in records}),
        "buffered_frames_max": [max(r.buffered_frames_max for r in part) for part in (first, second)],
        "pending_units_max": [max(r.pending_units_max for r in part) for part in (first, second)],
    }
    scores = endpoint_scores(list(pauses), list(endpoints), grace_s)
    cuts = [e for e in endpoints if e["reason"].endswith("_capacity")]
    out: dict[str, dict[str, Any]] = {
        "state": state,
        "endpoints": {"ok": min(scores["precision"], scores["recall"]) >= min_endpoint_score,
                      **scores, "limit": min_endpoint_score, "grace_s": grace_s},
        "capacity": {"ok": not cuts, "capacity_cuts": len(cuts), "first": cuts[:5]},
    }
    if not after:
        reason = "no interval after the warm-up: run longer or lower --interval-s"
        return {**out, "rss": {"ok": False, "why": reason}, "time": {"ok": False, "why": reason}}
    base = records[warm - 1].rss_mib
    peak = max(r.rss_mib for r in after)
    growth = (peak - base) / base
    out["rss"] = {"ok": growth < max_rss_growth, "after_warmup_mib": base, "peak_mib": peak,
                  "final_mib": records[-1].rss_mib, "growth": round(growth, 4),
                  "limit": max_rss_growth, "warmup_intervals": warm}
    # Per interval, the median segment cost follows what the random weights happen to write in
    # that stretch of audio; it is reported, and the verdict compares like with like.
    intervals = {"cpu": _flatness([r.seg_cpu_ms_median for r in after], max_time_ratio),
                 "wall": _flatness([r.seg_ms_median for r in after], max_time_ratio)}
    for trend in intervals.values():
        trend.pop("ok")
    out["time"] = {**repeat_ratio(list(sentences), records[warm - 1].audio_s, max_time_ratio),
                   "intervals_last_over_first_quarter": intervals}
    return out


# ---- report -------------------------------------------------------------------------------------


def render_plot(result: dict[str, Any], path: Path) -> bool:
    """RSS and per-segment time (median, p95) against audio minutes; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = result["records"]
    minutes = [r["audio_s"] / 60 for r in records]
    fig, (ax_mem, ax_time) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax_mem.plot(minutes, [r["rss_mib"] for r in records], marker=".", label="RSS")
    rss = result["verdicts"]["rss"]
    if "after_warmup_mib" in rss:  # the pass/fail line: +5 % over the RSS after warm-up
        ax_mem.axhline(rss["after_warmup_mib"] * (1 + rss["limit"]), color="tab:red", ls="--",
                       label=f"after warm-up +{100 * rss['limit']:.0f} %")
        ax_mem.legend()
    ax_mem.set_ylabel("RSS (MiB)")
    ax_mem.set_title(f"soak: {result['settings']['artifacts_name']}, "
                     f"{result['settings']['backend']}, segment {result['settings']['segment_ms']} ms")
    for key, label in (("seg_ms_median", "wall, median"), ("seg_ms_p95", "wall, p95"),
                       ("seg_cpu_ms_median", "CPU, median")):
        ax_time.plot(minutes, [r[key] for r in records], marker=".", label=label)
    ax_time.set_ylabel("per-segment compute (ms)")
    ax_time.set_xlabel("audio (minutes)")
    ax_time.set_ylim(bottom=0)
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", metavar="DIR", help="artifacts folder (echostream export)")
    p.add_argument("--write-audio", type=Path, metavar="FILE",
                   help="write the soak's audio (sentences and pauses, --minutes/--hours of it) to "
                        "FILE at 16 kHz and stop: the long recording of `echostream translate`'s demo")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--hours", type=float, help="audio to stream (default 1 h)")
    length.add_argument("--minutes", type=float, help="audio to stream, in minutes")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--segment-ms", type=int, default=320)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per accept_waveform call (default 100)")
    p.add_argument("--interval-s", type=float, default=60.0, help="audio seconds per record (default 60)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--speech", choices=("espeak", "synthetic"), default="espeak",
                        help="the sentences: espeak-ng speech (default) or synthetic harmonics")
    source.add_argument("--audio", metavar="FILE", help="loop this file (a pause after every pass)")
    p.add_argument("--voices", default=",".join(VOICES), help="espeak-ng voices taking turns")
    p.add_argument("--sample-rate", type=int, default=16000, help="rate of the synthetic audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--silence-stand-in", action="store_true",
                   help="the endpoint's energy gate at digital silence (needed by the seeded presets' "
                        "random ASR head; see the module docstring)")
    p.add_argument("--endpoint-after-text-ms", type=float, default=1000.0)
    p.add_argument("--endpoint-no-text-ms", type=float, default=3000.0)
    p.add_argument("--carry-encoder", action="store_true", help="the Emformer state carries across sentences")
    p.add_argument("--out", type=Path, default=Path("bench/out/soak.json"))
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verdicts", default=",".join(VERDICTS),
                   help=f"verdicts that set the exit status (default {','.join(VERDICTS)})")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--max-time-ratio", type=float, default=1.1)
    p.add_argument("--min-endpoint-score", type=float, default=0.95)
    args = p.parse_args(argv)
    args.total_s = 60.0 * args.minutes if args.minutes is not None else 3600.0 * (args.hours or 1.0)
    wanted = [v for v in args.verdicts.split(",") if v]
    if args.total_s <= 0 or args.chunk_ms <= 0 or args.interval_s <= 0:
        p.error("--hours/--minutes, --chunk-ms and --interval-s must be positive")
    if unknown := sorted(set(wanted) - set(VERDICTS)):
        p.error(f"--verdicts: unknown {unknown}; expected some of {list(VERDICTS)}")
    if args.artifacts is None and args.write_audio is None:
        p.error("--artifacts is required (or --write-audio FILE)")
    written = args.write_audio if args.write_audio is not None else args.out
    if written.exists() and not args.force:
        p.error(f"{written} exists; pass --force to replace it")
    args.verdicts = wanted
    args.voices = tuple(v for v in args.voices.split(",") if v)
    return args


def audio_pool(args: argparse.Namespace) -> list[Piece]:
    if args.audio is not None:
        return file_pool(args.audio)
    if args.speech == "espeak":
        return espeak_pool(args.voices, args.seed)
    return synthetic_pool(args.sample_rate, args.seed)


def build_translator(args: argparse.Namespace) -> Any:
    from echostream.runtime.endpoint import DIGITAL_SILENCE_LOG_MEL, EndpointConfig
    from echostream.runtime.translator import Translator

    options = {"threads": args.threads} if args.backend == "onnxruntime" else {}
    floor = DIGITAL_SILENCE_LOG_MEL if args.silence_stand_in else None
    rules = EndpointConfig(args.endpoint_after_text_ms, args.endpoint_no_text_ms, args.carry_encoder,
                           floor)
    return Translator.from_artifacts(args.artifacts, backend=args.backend,
                                     segment_ms=args.segment_ms, endpoint=rules, **options)


def write_audio(pool: list[Piece], total_s: float, path: Path) -> int:
    """The soak's timeline (pieces and pauses cycled, cut at ``total_s``) as a 16 kHz file;
    returns the sentences written."""
    import soundfile as sf

    from echostream.atomic import atomic_file
    from echostream.runtime.audio import MODEL_SAMPLE_RATE, StreamingResampler

    resampled = {}
    with atomic_file(path) as tmp, sf.SoundFile(tmp, "w", MODEL_SAMPLE_RATE, 1, "PCM_16",
                                                format="WAV") as out:
        written, count = 0, 0
        for piece in endless(pool):
            key = id(piece)
            if key not in resampled:
                resampler = StreamingResampler(piece.rate, MODEL_SAMPLE_RATE)
                resampled[key] = resampler.process(piece.speech, last=True)
            for part in (resampled[key], np.zeros(int(piece.pause_s * MODEL_SAMPLE_RATE), np.float32)):
                part = part[:max(0, int(total_s * MODEL_SAMPLE_RATE) - written)]
                out.write(part)
                written += len(part)
            count += 1
            if written >= total_s * MODEL_SAMPLE_RATE:
                return count
    return count


def main(argv: list[str] | None = None) -> int:
    from echostream.atomic import atomic_file

    args = parse_args(argv)
    try:
        pool = audio_pool(args)
        if args.write_audio is not None:
            count = write_audio(pool, args.total_s, args.write_audio)
            print(f"wrote {args.write_audio}: {args.total_s / 60:.1f} min, {count} sentences with pauses")
            return 0
        translator = build_translator(args)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    speech_s = sum(p.speech.size / p.rate for p in pool)
    print(f"soak: {args.total_s / 60:.1f} min of audio through {args.artifacts} ({args.backend}, "
          f"segment {args.segment_ms} ms, chunk {args.chunk_ms} ms); {len(pool)} sentences "
          f"({speech_s:.0f} s of speech) cycled, a pause after each", flush=True)
    soak = Soak(translator, args.chunk_ms, args.interval_s, log=lambda line: print(line, flush=True))
    soak.run(endless(pool), args.total_s)
    result_verdicts = verdicts(soak.records, soak.pauses, soak.endpoints, args.segment_ms / 1000,
                               args.max_rss_growth, args.max_time_ratio, args.min_endpoint_score,
                               sentences=soak.sentences)
    order = {id(piece): i for i, piece in enumerate(pool)}  # pool position of each sentence
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "force")}
    settings.update(artifacts_name=translator.config.get("name"), python=platform.python_version(),
                    machine=platform.machine(), cpus=os.cpu_count(),
                    torch_imported="torch" in sys.modules,
                    sentences_in_pool=[p.label for p in pool])
    result = {"settings": settings, "verdicts": result_verdicts,
              "summary": {"audio_s": round(soak.audio_s, 3), "wall_s": soak.records[-1].wall_s,
                          "sentences": sum(r.sentences for r in soak.records),
                          "pauses": len(soak.pauses),
                          "segments": sum(r.segments for r in soak.records)},
              "records": [asdict(r) for r in soak.records],
              "pauses_s": [[round(a, 3), round(b, 3)] for a, b in soak.pauses],
              "endpoints": soak.endpoints,
              "sentences": [{k: v for k, v in x.items() if k != "item"} | {"item": order[x["item"]]}
                            for x in soak.sentences]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plotted = not args.no_plot and render_plot(result, args.out.with_suffix(".png"))
    failed = [v for v in args.verdicts if not result_verdicts[v]["ok"]]
    for name, verdict in result_verdicts.items():
        detail = {k: v for k, v in verdict.items() if k != "ok"}
        print(f"verdict {name:<9} {'PASS' if verdict['ok'] else 'FAIL'}  {json.dumps(detail)}")
    print(f"wrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if plotted else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
