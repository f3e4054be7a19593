"""Many streams on one box: throughput, latency and memory vs the number of concurrent streams.

For each stream count N the run simulates N speakers starting at staggered times: speaker ``i``
joins ``i * stagger`` segments after the first; every *tick* (one policy segment of audio) each
active speaker delivers its next segment, and one ``Translator.decode_streams`` call decodes all of
them (every stage once per round, streams stacked on axis 0). The audio is different real speech
per speaker (espeak-ng sentences, several voices), at 16 kHz.

Measured per N:
- **throughput**: audio seconds decoded per wall second (all streams together);
- **per-segment compute**: the wall time of the tick each stream's segment was decoded in (what a
  stream waits for), p50 / p95 over all (stream, segment) pairs;
- **computation-aware latency**: ticks arrive in real time (tick ``k``'s audio is complete at
  ``(k + 1) * segment``); a tick's decoding starts when its audio is there and the previous tick is
  done (so a box that cannot keep up queues), and every event of the tick is delayed to the end of
  its decoding. AL_CA of each stream's translation tokens (SimulEval's AL on those delays);
- **FLOP/s**: per stage, FLOPs (a call of B rows = B x the batch-1 graph's FLOPs) over that stage's
  measured seconds, and for the whole pipeline over the wall time, as fractions of the GEMM peak
  measured in the same run;
- **memory** (optional, fresh child process per N): peak RSS, and the RSS each added stream costs
  against the bytes of its model state.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from echostream.contract import UNIT_SHORT_STAGE

# Target tokens per source second of a trained model's translations: the CVSS-C fr-en references
# of ../shared/streamspeech/example in the released target SentencePiece model (15 tokens for
# 4.35 s, 19 for 3.99 s). Seeded weights never emit </s>, so without a cap every utterance's
# final decode runs to the policy's final_max_len (100 tokens for ~5 s of speech, 5x a trained
# model's), and the unit decoder's calls with it.
TRAINED_TOKENS_PER_S = 4.1

SENTENCES = (
    "The history of simultaneous interpretation begins in the nineteen twenties.",
    "Delegates wanted to hear every speech in their own language while it was given.",
    "Today the same idea drives streaming speech translation on small computers.",
    "A model reads the incoming audio in short segments and decides when to speak.",
    "It commits to a few more words whenever it has heard enough of the sentence.",
    "The translation starts before the speaker has finished the thought.",
    "Latency and quality pull in opposite directions, and every system picks a point.",
    "Batching many speakers on one machine turns thin matrix products into thick ones.",
)
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3")


# ---- inputs ----------------------------------------------------------------------------------------


def speech_pool(out: Path, count: int, quick: bool) -> list[np.ndarray]:
    """``count`` different utterances at 16 kHz (espeak-ng sentence x voice; quick mode falls back
    to synthetic voiced signals of different pitch when espeak-ng is missing)."""
    import soundfile as sf

    from echostream.runtime.audio import StreamingResampler

    from .speech import synthesize_speech, synthetic_voice

    pool = []
    for i in range(count):
        path = out / f"speaker{i:02d}.wav"
        try:
            synthesize_speech(path, SENTENCES[i % len(SENTENCES)], VOICES[i % len(VOICES)],
                              words_per_minute=150 + 10 * (i % 4))
        except RuntimeError:
            if not quick:
                raise
            synthetic_voice(path, seconds=3.0 + 0.25 * i)
        samples, rate = sf.read(str(path), dtype="float32")
        resampler = StreamingResampler(rate, 16000)
        pool.append(np.concatenate([resampler.process(samples), resampler.flush()]))
    return pool


def trained_length_policy(pool: Sequence[np.ndarray], tokens_per_s: float):
    """A policy whose final decode stops where a trained model's translation of the pool's
    longest utterance would (``tokens_per_s`` x its seconds, prefix included); None for 0."""
    from echostream.runtime.policy import PolicyConfig

    if not tokens_per_s:
        return None
    longest_s = max(len(a) for a in pool) / 16000.0
    return PolicyConfig(final_max_len=max(1, math.ceil(tokens_per_s * longest_s)))


# ---- measuring stage calls -------------------------------------------------------------------------


class StageMeter:
    """A stage seen through a meter: seconds, calls and rows of every ``run``."""

    def __init__(self, stage):
        self.stage = stage
        self.contract = stage.contract
        self.seconds = 0.0
        self.calls = 0
        self.rows = 0

    def run(self, inputs, state=None, context=None):
        start = time.perf_counter()
        try:
            return self.stage.run(inputs, state, context)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.rows += int(next(iter(inputs.values())).shape[0])

    def __getattr__(self, name):  # initial_state, copy_state, stack_states, ...
        return getattr(self.stage, name)


def metered(translator) -> dict[str, StageMeter]:
    """Wrap the translator's stages in meters (in place); returns them by stage name."""
    meters = {name: StageMeter(stage) for name, stage in translator.stages.items()}
    translator.stages.update(meters)
    return meters


# ---- one stream count ------------------------------------------------------------------------------


def run_streams(translator, pool: Sequence[np.ndarray], n: int, stagger: int,
                graph_flops: Mapping[str, int], peak_gflops: float) -> dict[str, Any]:
    """N staggered speakers through ``decode_streams``, one call per tick (see module doc)."""
    from echostream.runtime.metrics import average_lagging

    seg = int(translator.segment_ms * 16)  # samples per tick at 16 kHz
    seg_s = translator.segment_ms / 1000.0
    audio = [pool[i % len(pool)] for i in range(n)]
    start_tick = [i * stagger for i in range(n)]
    ticks = [start_tick[i] + -(-len(a) // seg) for i, a in enumerate(audio)]
    streams = [translator.create_stream() for _ in range(n)]
    meters = metered(translator)
    for m in meters.values():
        m.seconds = m.calls = m.rows = 0
    delays: list[list[float]] = [[] for _ in range(n)]
    tick_walls: list[tuple[float, list[int]]] = []
    clock = 0.0  # simulated time (s) when the box is free again
    wall = 0.0
    for k in range(max(ticks)):
        active = [i for i in range(n) if start_tick[i] <= k < ticks[i]]
        for i in active:
            j = k - start_tick[i]
            streams[i].accept_waveform(16000, audio[i][j * seg:(j + 1) * seg])
            if k == ticks[i] - 1:
                streams[i].input_finished()
        t0 = time.perf_counter()
        results = translator.decode_streams([streams[i] for i in active])
        spent = time.perf_counter() - t0
        wall += spent
        tick_walls.append((spent, active))
        clock = max(clock, (k + 1) * seg_s) + spent
        for i, events in zip(active, results):
            done_ms = 1000.0 * (clock - start_tick[i] * seg_s)
            delays[i] += [max(done_ms, e.source_ms) for e in events if e.kind == "translation"
                          for _ in e.token_ids]
    audio_s = sum(len(a) for a in audio) / 16000.0
    per_segment = [w for w, active in tick_walls for _ in active]
    al_ca = [average_lagging(d, 1000.0 * len(a) / 16000.0) for d, a in zip(delays, audio) if d]
    stage_rows = {s: {"calls": m.calls, "rows": m.rows, "seconds": m.seconds,
                      "gflops_achieved": (m.rows * graph_flops.get(s, 0) / 1e9 / m.seconds)
                      if m.seconds else 0.0}
                  for s, m in meters.items()}
    for entry in stage_rows.values():
        entry["fraction_of_peak"] = entry["gflops_achieved"] / peak_gflops
    total_gflop = sum(m.rows * graph_flops.get(s, 0) for s, m in meters.items()) / 1e9
    in_stages = sum(m.seconds for m in meters.values())
    return {
        "streams": n, "audio_s": audio_s, "wall_s": wall, "throughput": audio_s / wall,
        "segment_compute_p50_ms": 1000.0 * _percentile(per_segment, 50),
        "segment_compute_p95_ms": 1000.0 * _percentile(per_segment, 95),
        "al_ca_ms_median": statistics.median(al_ca) if al_ca else None,
        "al_ca_ms_max": max(al_ca) if al_ca else None,
        "stages": stage_rows,
        "gflops_per_wall_s": total_gflop / wall,
        "fraction_of_peak": total_gflop / wall / peak_gflops,
        "outside_stages_share": max(0.0, 1.0 - in_stages / wall),
        "segment_s": seg_s,
    }


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


# ---- memory per stream (fresh child processes) -----------------------------------------------------

_CHILD = r"""
import json, sys
import numpy as np
import psutil
from echostream.bench.soak import host_states
from echostream.runtime.translator import Translator
artifacts, n, threads, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
translator = Translator.from_artifacts(artifacts, threads=threads)
loaded = psutil.Process().memory_info().rss
rng = np.random.default_rng(0)
streams = [translator.create_stream() for _ in range(n)]
seg = translator.segment_ms * 16
held = 0
for k in range(int(seconds * 16000) // seg):
    for s in streams:
        s.accept_waveform(16000, (0.1 * rng.standard_normal(seg)).astype(np.float32))
    translator.decode_streams(streams)
    held = max(held, sum(a.nbytes for s in streams for arrays in host_states(s).values()
                         for a in arrays.values()))
peak = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
print(json.dumps({"streams": n, "loaded_rss_bytes": loaded, "peak_rss_bytes": peak,
                  "state_bytes_per_stream": held // n}))
"""


def memory_per_stream(artifacts: str | Path, counts: Sequence[int], threads: int,
                      seconds: float = 6.0, timeout_s: float = 1800) -> list[dict[str, Any]]:
    """Peak RSS of a fresh process decoding N streams of noise together, for each N."""
    rows = []
    for n in counts:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(artifacts), str(n), str(threads),
                              str(seconds)], capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            tail = "\n".join(out.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"memory child for {n} streams failed (exit {out.returncode}):\n{tail}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def state_bytes_per_stream(artifacts) -> int:
    """The most bytes of model state one stream can hold (every stateful stage's contract, batch
    1; of the two unit-decoder graphs, the full one: a sentence holds one of them at a time)."""
    from .windows import state_bytes

    return sum(state_bytes(artifacts.contract(s)) for s in artifacts.stages
               if s != UNIT_SHORT_STAGE)


def held_state_per_stream(memory: Sequence[Mapping[str, Any]]) -> int | None:
    """The state a stream really held (the memory run with the most streams: the most state its
    streams held at once, per stream), the bytes that RSS per added stream is compared with."""
    rows = [m for m in memory if m.get("state_bytes_per_stream")]
    return max(rows, key=lambda m: m["streams"])["state_bytes_per_stream"] if rows else None


def added_rss_per_stream(memory: Sequence[Mapping[str, Any]]) -> float | None:
    """Least-squares slope of peak RSS over the stream count (bytes per added stream)."""
    if len(memory) < 2:
        return None
    n = np.array([m["streams"] for m in memory], dtype=np.float64)
    rss = np.array([m["peak_rss_bytes"] for m in memory], dtype=np.float64)
    return float(np.polyfit(n, rss, 1)[0])


# ---- plot ------------------------------------------------------------------------------------------


def render_streams_plot(streams: Mapping[str, Any], path: str | Path) -> bool:
    """Two panels against concurrent streams: aggregate throughput (audio s per wall s) with the
    ideal linear scaling from one stream, and p50/p95 per-segment compute with the real-time line.
    Returns False (and writes nothing) when the part did not run."""
    if not streams or not streams.get("runs"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = streams["runs"]
    n = [r["streams"] for r in runs]
    segment_ms = 1000.0 * runs[0]["segment_s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(n, [r["throughput"] for r in runs], "o-", label="decode_streams")
    left.plot(n, [runs[0]["throughput"] * k / n[0] for k in n], ":", color="grey",
              label="linear in streams (from 1)")
    left.set_title("Throughput vs concurrent streams")
    left.set_ylabel("audio s decoded per wall s (all streams)")
    right.plot(n, [r["segment_compute_p95_ms"] for r in runs], "o-", label="p95")
    right.plot(n, [r["segment_compute_p50_ms"] for r in runs], "o:", label="p50")
    right.axhline(segment_ms, color="grey", lw=0.8, ls="--", label=f"segment ({segment_ms:.0f} ms)")
    right.set_title("Per-segment compute")
    right.set_ylabel("ms (the decode round a segment waited for)")
    right.set_yscale("log")
    stream_count_axes((left, right), n)
    fig.suptitle(f"Many streams on one engine (ONNX Runtime, {streams.get('threads')} thread(s))")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return True


def stream_count_axes(axes, counts: Sequence[int]) -> None:
    """The x axis of every plot against concurrent streams: log2, a tick per count measured."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
