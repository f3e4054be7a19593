"""Streams through Triton vs in process: throughput and per-chunk latency at 1..16 concurrent streams.

The same N speakers (``bench/streams.py``'s pool), all starting together, are decoded two ways in
one run, on the same machine and thread count:

- **in process**: one ``Translator``; every tick each active stream gets its next segment and one
  ``decode_streams`` call decodes them all (``run_streams`` with no stagger). Per-chunk latency: the
  wall time of the tick a stream's segment was decoded in.
- **through Triton**: the real ``tritonserver`` on 127.0.0.1 serving a repository of the same
  artifacts (one instance, ``max_sequences`` = the largest N, ``threads`` ONNX Runtime threads); N
  client threads, one gRPC stream and one sequence each, each sending its next segment as soon as
  the previous one is answered (a closed loop: as fast as the server goes). Per-chunk latency:
  send -> answer. The batcher's mean requests per ``execute`` (Triton's own counters) say how well
  the sequences were batched.

Throughput is audio seconds decoded per wall second, all streams together. Both sides do the same
decoding work; what Triton adds is gRPC, the Python backend's shared-memory hops and the batcher's
queue delay -- and the clients run on the same cores as the server.
"""
from __future__ import annotations

import importlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from echostream.errors import EchoStreamError
from echostream.runtime.triton_repo import DEFAULT_QUEUE_DELAY_US


def available() -> str | None:
    """None when Triton can run here, else why not (one line)."""
    from echostream.runtime.triton_server import find_tritonserver, resolve_model_env

    try:
        importlib.import_module("tritonclient.grpc")
    except ImportError as exc:
        return f"tritonclient is not installed ({exc})"
    try:
        resolve_model_env(None, find_tritonserver())
    except EchoStreamError as exc:
        return str(exc)
    return None


def triton_streams(artifacts_dir: Path, pool: Sequence[np.ndarray], counts: Sequence[int],
                   threads: int, segment_ms: int, log,
                   max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> dict[str, Any]:
    """In-process vs Triton rows for each stream count (see the module doc)."""
    from echostream.bench.streams import run_streams
    from echostream.runtime.endpoint import EndpointConfig
    from echostream.runtime.translator import Translator
    from echostream.runtime.triton_repo import write_repository
    from echostream.runtime.triton_server import TritonServer, free_port

    why = available()
    if why is not None:
        return {"available": False, "note": why}
    # Both sides with the rules a served model has by default (`translate`'s: endpointing on).
    endpoint = EndpointConfig()
    translator = Translator.from_artifacts(artifacts_dir, threads=threads, segment_ms=segment_ms,
                                           endpoint=endpoint)
    with tempfile.TemporaryDirectory(prefix="echostream-bench-triton-") as tmp:
        repo = write_repository(artifacts_dir, Path(tmp) / "repo", copy=False, threads=threads,
                                max_sequences=max(counts), segment_ms=segment_ms,
                                max_queue_delay_us=max_queue_delay_us, endpoint=endpoint,
                                # a closed loop on a small box can wait minutes for one answer
                                idle_timeout_s=3600.0)
        server = TritonServer(repo, free_port(), free_port(), free_port()).start(300)
        try:
            warm = min(4, max(counts))  # first calls allocate; a few streams are enough
            log(f"triton: server up on {server.grpc_url}; warm-up with {warm} streams")
            _triton_run(server, pool, warm, segment_ms)
            run_streams(translator, pool, warm, 0, {}, 1.0)
            rows = []
            for n in counts:
                log(f"triton: {n} concurrent stream(s), in process then through Triton")
                local = run_streams(translator, pool, n, 0, {}, 1.0)
                remote = _triton_run(server, pool, n, segment_ms)
                rows.append({"streams": n,
                             "in_process": {k: local[k] for k in (
                                 "audio_s", "wall_s", "throughput", "segment_compute_p50_ms",
                                 "segment_compute_p95_ms")},
                             "triton": remote,
                             "throughput_ratio": remote["throughput"] / local["throughput"]})
        finally:
            server.stop()
    return {"available": True, "counts": list(counts), "runs": rows, "threads": threads,
            "instances": 1, "max_queue_delay_us": max_queue_delay_us, "segment_ms": segment_ms,
            "server": server.binary.source, "model_env": server.model_env.describe()}


def _triton_run(server, pool: Sequence[np.ndarray], n: int, segment_ms: int) -> dict[str, Any]:
    from echostream.runtime.triton_client import TritonTranslator
    from echostream.runtime.triton_server import metric_sum, read_metrics

    client = TritonTranslator(server.grpc_url, timeout_s=600)
    seg = 16 * segment_ms
    audio = [pool[i % len(pool)] for i in range(n)]
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    streams = [client.create_stream() for _ in range(n)]
    go = threading.Barrier(n + 1)

    def speaker(i: int) -> None:
        try:
            go.wait()
            stream, samples = streams[i], audio[i]
            for k in range(0, len(samples), seg):
                t0 = time.perf_counter()
                stream.accept_waveform(16000, samples[k:k + seg])
                latencies[i].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stream.finish()
            latencies[i].append(time.perf_counter() - t0)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    before = read_metrics(server.metrics_url)
    workers = [threading.Thread(target=speaker, args=(i,), daemon=True) for i in range(n)]
    for w in workers:
        w.start()
    go.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    sent = sum(s.sent for s in streams)
    for s in streams:
        s.close()
    if errors:
        raise errors[0]
    # The backend records a request's statistics after its response went out: wait (briefly)
    # until the counters hold every request sent.
    deadline = time.monotonic() + 10.0
    while True:
        after = read_metrics(server.metrics_url)
        requests = metric_sum(after, "nv_inference_count") - metric_sum(before, "nv_inference_count")
        if requests >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    execs = metric_sum(after, "nv_inference_exec_count") - metric_sum(before, "nv_inference_exec_count")
    queue_us = (metric_sum(after, "nv_inference_queue_duration_us")
                - metric_sum(before, "nv_inference_queue_duration_us"))
    flat = [x for per in latencies for x in per]
    audio_s = sum(len(a) for a in audio) / 16000.0
    return {"audio_s": audio_s, "wall_s": wall, "throughput": audio_s / wall,
            "chunk_latency_p50_ms": 1000.0 * float(np.percentile(flat, 50)),
            "chunk_latency_p95_ms": 1000.0 * float(np.percentile(flat, 95)),
            "requests": int(requests), "executes": int(execs),
            "requests_per_execute": requests / execs if execs else None,
            "queue_ms_per_request": queue_us / 1000.0 / requests if requests else None}


def render_triton_plot(triton: dict[str, Any], path: str | Path) -> bool:
    """Two panels, in process vs through Triton against concurrent streams: throughput (audio s
    per wall s) and p50/p95 per-chunk latency. Returns False (and writes nothing) when the part
    did not run."""
    if not triton or not triton.get("available") or not triton.get("runs"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .streams import stream_count_axes

    runs = triton["runs"]
    n = [r["streams"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(n, [r["in_process"]["throughput"] for r in runs], "o-", label="in process (decode_streams)")
    left.plot(n, [r["triton"]["throughput"] for r in runs], "s-", label=f"through Triton ({triton['server']})")
    left.set_title("Throughput vs concurrent streams")
    left.set_ylabel("audio s decoded per wall s (all streams)")
    for side, style, label in (("in_process", "o", "in process"), ("triton", "s", "Triton")):
        p50 = "segment_compute_p50_ms" if side == "in_process" else "chunk_latency_p50_ms"
        p95 = "segment_compute_p95_ms" if side == "in_process" else "chunk_latency_p95_ms"
        right.plot(n, [r[side][p95] for r in runs], style + "-", label=f"{label} p95")
        right.plot(n, [r[side][p50] for r in runs], style + ":", label=f"{label} p50")
    right.set_title(f"Latency per {triton['segment_ms']} ms chunk")
    right.set_ylabel("ms (Triton: send -> answer; in process: the decode round)")
    right.axhline(triton["segment_ms"], color="grey", lw=0.8, ls="--", label="real time")
    stream_count_axes((left, right), n)
    fig.suptitle(f"EchoStream through Triton vs in process ({triton['threads']} ORT thread(s), "
                 f"{triton['instances']} instance)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return True
