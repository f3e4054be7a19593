"""Soak test: hours of audio through one translator stream, watching memory and per-segment time.

A streaming runtime runs on a device nobody watches, so it must not grow. This script feeds
``--hours`` (or ``--minutes``) of audio through one :class:`~echostream.runtime.translator.Stream`
in microphone-sized chunks (``--chunk-ms``), decoding after every chunk, with an end-of-sentence
reset after every sentence. Sentence ends alternate between the two ways a deployment ends one:

- ``flush``: ``input_finished()`` -> ``decode()`` (final decode to ``</s>``, synthesiser flushed,
  ``EndOfStream``) -> ``reset()`` (fresh audio front end);
- ``cut``: ``reset()`` mid-stream, as at a pause a VAD found (unconsumed audio is kept).

Every ``--interval-s`` seconds of *audio* (default 60) it records the process RSS, the per-segment
compute time (accept + decode wall time of the chunks that completed policy segments, divided by
the segments), the number of Python objects, the total bytes of every state tensor, the buffered
fbank frames and pending synthesiser units; state shapes are checked after every chunk. At the end
it prints and stores three verdicts:

- ``state``: no state tensor ever changed dtype or shape, no buffer grows (the largest buffered frame
  count and pending synthesiser units of the second half are no larger than in the first half), and
  the number of live Python objects grows by at most 100 after the warm-up (a Python-level leak of
  one object per segment or sentence shows up here long before it shows in RSS);
- ``rss``: the peak RSS after the warm-up is < ``--max-rss-growth`` (5 %) above the RSS at its end
  (warm-up: the first 10 % of the audio, at most 5 minutes, and at least until both kinds of
  sentence end have run);
- ``time``: per-segment time is flat: the median of the last quarter of the post-warm-up intervals
  is at most ``--max-time-ratio`` (1.25) x the median of the first quarter.

Audio: deterministic synthetic "sentences" (a gliding harmonic voice gated into syllables, plus a
chirp that drives even random-weight models, 4-12 s each, then a 0.3-1 s pause) at
``--sample-rate`` (resampled by the runtime when it is not 16 kHz): a pool of 21 made up front and
cycled, so the soak itself allocates nothing while it runs; or ``--audio FILE`` looped, one sentence
per pass.

Usage::

    python bench/soak.py --artifacts engines/tiny --hours 1 --out bench/out/soak.json
    python bench/soak.py --artifacts engines/tiny --minutes 2 --interval-s 10 --verdicts state,rss

Writes ``--out`` (JSON: settings, one record per interval, verdicts) and a plot beside it
(``soak.png``: RSS and per-segment time against audio time). Exit status 1 if a requested verdict
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

VERDICTS = ("state", "rss", "time")
WARMUP_FRACTION, WARMUP_MAX_S = 0.10, 300.0


# ---- audio sources ------------------------------------------------------------------------------


def synthetic_sentence(index: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Sentence ``index`` of the synthetic source: ``[n]`` float32 in [-0.6, 0.6].

    4-12 s of "speech" (harmonics of a 100-200 Hz gliding pitch gated into ~4 Hz syllables, plus a
    quieter 200-3000 Hz chirp so that random-weight models emit tokens too), then 0.3-1 s of
    near-silence. Deterministic in (seed, index), so any run can be reproduced piecewise.
    """
    rng = np.random.default_rng([seed, index])
    speech_s, pause_s = rng.uniform(4.0, 12.0), rng.uniform(0.3, 1.0)
    t = np.arange(int(speech_s * sample_rate)) / sample_rate
    f0 = 150 + 50 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t), 0, None) ** 0.5
    sweep = np.linspace(200.0, 3000.0, t.size) if rng.random() < 0.5 else np.linspace(3000.0, 200.0, t.size)
    chirp = np.sin(2 * np.pi * np.cumsum(sweep) / sample_rate)
    speech = 0.2 * syllables * voice + 0.15 * chirp
    pause = 1e-3 * rng.standard_normal(int(pause_s * sample_rate))
    return np.clip(np.concatenate([speech, pause]), -0.6, 0.6).astype(np.float32)


def sentences(audio: str | None, sample_rate: int, seed: int,
              pool: int = 21) -> Iterator[tuple[np.ndarray, int]]:
    """Endless ``(samples [n] float32, rate)`` sentences: the looped file, or a pool of ``pool``
    synthetic ones cycled (made up front, so generating audio allocates nothing during the soak and
    RSS shows the runtime alone; an odd pool size gives every sentence both kinds of sentence end)."""
    if audio is not None:
        from echostream.runtime.audio import read_audio

        samples, rate = read_audio(audio)
        while True:
            yield samples, rate
    made = [synthetic_sentence(i, sample_rate, seed) for i in range(pool)]
    while True:
        for samples in made:
            yield samples, sample_rate


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
    """``"stage.tensor" -> [dtype, *shape]`` of every state tensor (what must never change)."""
    return {f"{stage}.{name}": [str(a.dtype), *a.shape]
            for stage, arrays in host_states(stream).items() for name, a in arrays.items()}


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
    rtf: float  # compute / audio within this interval
    sentences: int  # sentence ends (flush + cut) within this interval
    flush_ms_max: float | None  # slowest end-of-sentence flush
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
    flush_ms: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    sentences: int = 0
    state_changed: bool = False
    buffered_max: int = 0
    pending_max: int = 0
    asr: int = 0
    tokens: int = 0
    samples: int = 0


class Soak:
    """Drives one stream of ``translator`` and records an :class:`Interval` per ``interval_s``."""

    def __init__(self, translator: Any, chunk_ms: int, interval_s: float, log=print):
        self.translator, self.chunk_ms, self.interval_s, self.log = translator, chunk_ms, interval_s, log
        self.stream = translator.create_stream()
        self.signature = state_signature(self.stream)
        self.records: list[Interval] = []
        self.audio_s = 0.0
        self._start = time.perf_counter()
        self._window = _Window()
        self._pending_s = 0.0  # compute of chunks that completed no segment yet
        self._sentence = 0

    def run(self, source: Iterator[tuple[np.ndarray, int]], total_s: float) -> list[Interval]:
        """Feed sentences until ``total_s`` seconds of audio have gone in."""
        for samples, rate in source:
            self._feed_sentence(samples, rate, total_s)
            if self.audio_s >= total_s:
                break
        if not self.records or self.audio_s - self.records[-1].audio_s > 1e-3:  # a partial interval
            self._record()
        return self.records

    def _feed_sentence(self, samples: np.ndarray, rate: int, total_s: float) -> None:
        step = max(1, rate * self.chunk_ms // 1000)
        for start in range(0, samples.size, step):
            self._feed_chunk(samples[start:start + step], rate)
            if self.audio_s >= total_s:
                break
        self._end_sentence()

    def _feed_chunk(self, chunk: np.ndarray, rate: int) -> None:
        stream, before = self.stream, self.stream.encoder_steps
        t0 = time.perf_counter()
        stream.accept_waveform(rate, chunk)
        events = self.translator.decode(stream)
        spent = time.perf_counter() - t0
        self._count(events, spent)
        segments = (stream.encoder_steps - before) // self.translator.steps_per_segment
        if segments:
            per = 1000.0 * (spent + self._pending_s) / segments
            self._window.seg_ms += [per] * segments
            self._pending_s = 0.0
        else:
            self._pending_s += spent
        w = self._window  # probes after the timed region: they cost the stream nothing
        w.state_changed |= state_signature(stream) != self.signature
        w.buffered_max = max(w.buffered_max, buffered_frames(stream))
        w.pending_max = max(w.pending_max, stream.synthesizer.pending_units)
        previous = self.audio_s
        self.audio_s += chunk.size / rate
        if math.floor(self.audio_s / self.interval_s) > math.floor(previous / self.interval_s):
            self._record()

    def _end_sentence(self) -> None:
        """Alternate a full flush and a mid-stream cut (see the module docstring)."""
        stream = self.stream
        t0 = time.perf_counter()
        if self._sentence % 2 == 0:
            stream.input_finished()
            events = self.translator.decode(stream)
            if not stream.finished or events[-1].kind != "end":
                raise RuntimeError("the flush did not end with EndOfStream")
        else:
            events = []
        stream.reset()
        spent = time.perf_counter() - t0
        self._count(events, spent)
        self._window.flush_ms.append(1000.0 * spent)
        self._window.sentences += 1
        self._pending_s = 0.0
        self._sentence += 1

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

    def _record(self) -> None:
        w = self._window
        seg = np.asarray(w.seg_ms) if w.seg_ms else None
        audio_in_window = self.audio_s - (self.records[-1].audio_s if self.records else 0.0)
        timing = {"seg_ms_median": None, "seg_ms_p95": None, "seg_ms_max": None}
        if seg is not None:
            timing = {"seg_ms_median": round(float(np.median(seg)), 3),
                      "seg_ms_p95": round(float(np.percentile(seg, 95)), 3),
                      "seg_ms_max": round(float(seg.max()), 3)}
        states = host_states(self.stream)
        changed = w.state_changed or state_signature(self.stream) != self.signature
        # Memory last, after everything above has allocated what it needs.
        rss = rss_bytes()
        objects = len(gc.get_objects()) - len(self.records)  # the soak's own records excluded
        record = Interval(
            audio_s=round(self.audio_s, 3), wall_s=round(time.perf_counter() - self._start, 3),
            rss_mib=round(rss / 2**20, 2), py_objects=objects, segments=len(w.seg_ms), **timing,
            rtf=round(w.compute_s / max(audio_in_window, 1e-9), 4), sentences=w.sentences,
            flush_ms_max=round(max(w.flush_ms), 3) if w.flush_ms else None,
            state_bytes=sum(a.nbytes for arrays in states.values() for a in arrays.values()),
            state_changed=changed, buffered_frames_max=w.buffered_max,
            pending_units_max=w.pending_max, asr_tokens=w.asr, translation_tokens=w.tokens,
            speech_samples=w.samples,
        )
        self.records.append(record)
        self._window = _Window()
        self.log(f"[{record.audio_s / 60:7.2f} min audio | {record.wall_s:8.1f} s wall] "
                 f"RSS {record.rss_mib:8.1f} MiB  segment {record.seg_ms_median} ms (p95 "
                 f"{record.seg_ms_p95})  RTF {record.rtf:.3f}  objects {record.py_objects}")


# ---- verdicts -----------------------------------------------------------------------------------


def warmup_count(records: list[Interval]) -> int:
    """Intervals that count as warm-up: the first 10 % of the audio (at most 5 minutes), and at
    least until both kinds of sentence end (flush, cut) have run once; >= 1."""
    if not records:
        return 0
    limit = min(WARMUP_FRACTION * records[-1].audio_s, WARMUP_MAX_S)
    by_audio = sum(r.audio_s <= limit for r in records)
    ends = np.cumsum([r.sentences for r in records])
    by_sentences = int(np.searchsorted(ends, 2)) + 1  # first record with >= 2 sentence ends
    return min(len(records), max(1, by_audio, by_sentences))


def verdicts(records: list[Interval], max_rss_growth: float = 0.05, max_time_ratio: float = 1.25,
             max_new_objects: int = 100) -> dict[str, dict[str, Any]]:
    """The three verdicts (see the module docstring), each ``{"ok": bool, ...numbers}``."""
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
    out: dict[str, dict[str, Any]] = {"state": state}
    if not after:
        reason = "no interval after the warm-up: run longer or lower --interval-s"
        return {**out, "rss": {"ok": False, "why": reason}, "time": {"ok": False, "why": reason}}
    base = records[warm - 1].rss_mib
    peak = max(r.rss_mib for r in after)
    growth = (peak - base) / base
    out["rss"] = {"ok": growth < max_rss_growth, "after_warmup_mib": base, "peak_mib": peak,
                  "final_mib": records[-1].rss_mib, "growth": round(growth, 4),
                  "limit": max_rss_growth, "warmup_intervals": warm}
    timed = [r.seg_ms_median for r in after if r.seg_ms_median is not None]
    quarter = max(1, len(timed) // 4)
    early, late = float(np.median(timed[:quarter])), float(np.median(timed[-quarter:]))
    ratio = late / early
    out["time"] = {"ok": ratio <= max_time_ratio, "first_quarter_ms": round(early, 3),
                   "last_quarter_ms": round(late, 3), "ratio": round(ratio, 4),
                   "limit": max_time_ratio}
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
    for key, label in (("seg_ms_median", "median"), ("seg_ms_p95", "p95")):
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
    p.add_argument("--artifacts", required=True, metavar="DIR", help="artifacts folder (echostream export)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--hours", type=float, help="audio to stream (default 1 h)")
    length.add_argument("--minutes", type=float, help="audio to stream, in minutes")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--segment-ms", type=int, default=320)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per accept_waveform call (default 100)")
    p.add_argument("--interval-s", type=float, default=60.0, help="audio seconds per record (default 60)")
    p.add_argument("--audio", metavar="FILE", help="loop this file (one sentence per pass) instead of "
                                                    "synthetic sentences")
    p.add_argument("--sample-rate", type=int, default=16000, help="rate of the synthetic audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/out/soak.json"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verdicts", default=",".join(VERDICTS),
                   help="verdicts that set the exit status (default state,rss,time)")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--max-time-ratio", type=float, default=1.25)
    args = p.parse_args(argv)
    args.total_s = 60.0 * args.minutes if args.minutes is not None else 3600.0 * (args.hours or 1.0)
    wanted = [v for v in args.verdicts.split(",") if v]
    if args.total_s <= 0 or args.chunk_ms <= 0 or args.interval_s <= 0:
        p.error("--hours/--minutes, --chunk-ms and --interval-s must be positive")
    if unknown := sorted(set(wanted) - set(VERDICTS)):
        p.error(f"--verdicts: unknown {unknown}; expected some of {list(VERDICTS)}")
    args.verdicts = wanted
    return args


def main(argv: list[str] | None = None) -> int:
    from echostream.runtime.translator import Translator

    args = parse_args(argv)
    options = {"threads": args.threads} if args.backend == "onnxruntime" else {}
    translator = Translator.from_artifacts(args.artifacts, backend=args.backend,
                                           segment_ms=args.segment_ms, **options)
    print(f"soak: {args.total_s / 60:.1f} min of audio through {args.artifacts} "
          f"({args.backend}, segment {args.segment_ms} ms, chunk {args.chunk_ms} ms)", flush=True)
    soak = Soak(translator, args.chunk_ms, args.interval_s,
                log=lambda line: print(line, flush=True))
    soak.run(sentences(args.audio, args.sample_rate, args.seed), args.total_s)
    result_verdicts = verdicts(soak.records, args.max_rss_growth, args.max_time_ratio)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings.update(artifacts_name=translator.config.get("name"), python=platform.python_version(),
                    machine=platform.machine(), cpus=os.cpu_count(),
                    torch_imported="torch" in sys.modules)
    result = {"settings": settings, "verdicts": result_verdicts,
              "summary": {"audio_s": soak.audio_s, "wall_s": soak.records[-1].wall_s,
                          "sentences": sum(r.sentences for r in soak.records),
                          "segments": sum(r.segments for r in soak.records)},
              "records": [asdict(r) for r in soak.records]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plotted = not args.no_plot and render_plot(result, args.out.with_suffix(".png"))
    failed = [v for v in args.verdicts if not result_verdicts[v]["ok"]]
    for name, verdict in result_verdicts.items():
        detail = {k: v for k, v in verdict.items() if k != "ok"}
        print(f"verdict {name:<5} {'PASS' if verdict['ok'] else 'FAIL'}  {json.dumps(detail)}")
    print(f"wrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if plotted else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
