"""``echostream bench``: every benchmark of issue #6 in one run on the machine at hand.

Parts (all on by default; ``--skip`` leaves some out):

1. ``position`` -- encoder cost per segment vs stream position, 5 s to 10 min: EchoStream's Emformer
   step (ONNX Runtime and PyTorch, real chained steps) against StreamSpeech's prefix re-encode
   (``ChunkConformerEncoder.encode_prefix``, ``streamspeech`` preset);
2. ``pipeline`` -- real-time factor of ``translate`` on espeak-ng speech (ONNX Runtime) with a
   per-stage breakdown, FLOPs per stage per audio second and the fraction of the GEMM peak;
   ``tuning`` -- the same pipeline at 1 / N threads with ORT thread spinning on / off;
3. ``backends`` -- per-stage step time, ONNX Runtime vs PyTorch eager, same thread count;
4. ``memory`` -- peak RSS of a ``translate`` run in a fresh process vs the bytes of the weights;
5. ``tensorrt`` -- the same stage timings and pipeline on TensorRT when a GPU and TensorRT exist;
6. ``windows`` -- what windows that hold a sentence cost: ms per call and state bytes per stream
   of the stages whose windows grew, pre-fidelity windows vs now (``bench/windows.py``);
8. ``algorithms`` -- StreamSpeech's agent, EchoStream ``exact`` and ``incremental`` on the same
   speech, ms per segment vs position, ``streamspeech`` preset (``bench/algorithms.py``);
7. ``streams`` -- 1..32 concurrent speakers through ``decode_streams``: throughput, per-segment
   compute p50/p95, computation-aware AL, FLOP/s vs peak, RSS per added stream
   (``bench/streams.py``);
9. ``triton`` -- the same speakers through the real ``tritonserver`` (a generated repository, gRPC
   streaming clients) beside in-process ``decode_streams`` at 1..16 streams: throughput and p95
   per-chunk latency (``bench/triton.py``); skipped with a note when Triton cannot run here.

Writes ``bench.json`` (every number, min/median/max), ``bench.md`` (tables + targets) and
``bench.png`` (plots; ``streams.png`` and ``triton.png`` too when those parts ran) to ``--out``
(default ``bench/out``). ``--quick`` is a smoke test on the
``tiny`` preset that runs in seconds once its artifacts exist. Timings are reported, never asserted.

    echostream bench --artifacts /tmp/engines/echostream            # full run, echostream preset
    echostream bench --quick --artifacts /tmp/engines/tiny          # smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from echostream.bench.streams import TRAINED_TOKENS_PER_S
from echostream.errors import BackendUnavailable, EchoStreamError
from echostream.runtime.triton_repo import DEFAULT_QUEUE_DELAY_US

PARTS = ("position", "pipeline", "streams", "algorithms", "tuning", "backends", "memory",
         "tensorrt", "windows", "triton")
FULL_STREAM_COUNTS = [1, 2, 4, 8, 16, 32]
QUICK_STREAM_COUNTS = [1, 2, 8]
FULL_TRITON_COUNTS = [1, 2, 4, 8, 16]


@dataclasses.dataclass
class Settings:
    """Everything that shapes the numbers; recorded in ``bench.json``."""

    preset: str
    threads: int
    repeats: int  # timed calls per step measurement
    warmup: int
    pipeline_repeats: int
    positions_s: list[float]
    baseline_preset: str
    baseline_budget_s: float
    gemm_size: int
    segment_ms: int
    backends: list[str]
    # The streams part's sentence length in target tokens per source second (0: the policy's
    # final_max_len); see bench/streams.py TRAINED_TOKENS_PER_S.
    tokens_per_s: float = 0.0


FULL_POSITIONS_S = [5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
QUICK_POSITIONS_S = [5.0, 10.0, 30.0, 60.0]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path, metavar="DIR",
                        help="exported artifacts of the preset (default: export it into "
                             "OUT/artifacts/<preset>, reused by later runs)")
    parser.add_argument("--preset", default=None,
                        help="preset to benchmark when exporting (default: echostream; tiny with --quick)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder (default bench/out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny preset, few repeats, positions up to 60 s")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every engine (default: physical cores)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--pipeline-repeats", type=int, default=None, help="timed translate runs")
    parser.add_argument("--audio", type=Path, help="speech file for the pipeline (default: espeak-ng)")
    parser.add_argument("--segment-ms", type=int, default=320, help="policy segment (default 320)")
    parser.add_argument("--baseline-budget-s", type=float, default=None,
                        help="seconds the StreamSpeech baseline curve may take (default 240; 10 quick)")
    parser.add_argument("--triton-streams", nargs="+", type=int, default=None, metavar="N",
                        help="concurrent streams of the triton part (default 1 2 4 8 16; quick: 1 2 8)")
    parser.add_argument("--triton-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                        metavar="US", help="the triton part's batcher queue delay (default "
                        f"{DEFAULT_QUEUE_DELAY_US}; longer fills batches of cheap chunks)")
    parser.add_argument("--tokens-per-s", type=float, default=TRAINED_TOKENS_PER_S, metavar="R",
                        help="the streams part ends each utterance's translation at R target "
                             "tokens per source second, as a trained model does (default "
                             f"{TRAINED_TOKENS_PER_S}: the real references'; random weights never "
                             "emit </s>, so 0 = decode to the policy's final_max_len)")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], metavar="PART",
                        help=f"parts to leave out: {', '.join(PARTS)}")
    parser.add_argument("--render", type=Path, metavar="BENCH.json",
                        help="measure nothing: re-render bench.md and bench.png (targets rechecked) "
                             "from a saved bench.json into --out")


def main(args: argparse.Namespace) -> int:
    bench = render_saved(args.render, args.out) if args.render else run_bench(args)
    out = Path(args.out)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    missed = [r for r in bench["targets"] if r["met"] is False]
    print(f"targets: {sum(r['met'] is True for r in bench['targets'])} met, {len(missed)} missed, "
          f"{sum(r['met'] is None for r in bench['targets'])} not measured")
    return 0


# ---- orchestration -------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts, write ``bench.json`` / ``bench.md`` / ``bench.png`` into ``args.out``."""
    import torch

    from echostream.bench.machine import gemm_peak, machine_info
    from echostream.bench.report import check_targets, render_markdown, render_plot
    from echostream.runtime.onnxruntime_backend import physical_cores

    settings = _settings(args, physical_cores())
    torch.set_num_threads(settings.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log()
    artifacts_dir = _artifacts(args, settings, out, log)
    bench: dict[str, Any] = {
        "schema": "echostream-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full", "preset": settings.preset,
        "artifacts": str(artifacts_dir), "command": _command_line(args, artifacts_dir),
        "settings": dataclasses.asdict(settings), "machine": machine_info(settings.threads),
    }
    log(f"GEMM peak at {settings.threads} threads")
    bench["gemm_peak"] = gemm_peak(settings.threads, settings.gemm_size, repeats=5)
    bench["gemm_peak"]["when"] = "start"
    bench["graphs"] = _graph_flops(artifacts_dir)
    parts = [p for p in PARTS if p not in args.skip]
    runners = {
        "position": lambda: _position_part(artifacts_dir, settings, log),
        "pipeline": lambda: _pipeline_part(artifacts_dir, settings, bench, args.audio, out,
                                           args.quick, log),
        "tuning": lambda: _tuning_part(artifacts_dir, settings, args.audio, out, args.quick, log),
        "backends": lambda: _backends_part(artifacts_dir, settings, log),
        "memory": lambda: _memory_part(artifacts_dir, settings, bench, args.audio, out, args.quick, log),
        "tensorrt": lambda: _tensorrt_part(artifacts_dir, settings, bench, log),
        "windows": lambda: _windows_part(artifacts_dir, settings, log),
        "streams": lambda: _streams_part(artifacts_dir, settings, bench, out, args.quick, log),
        "algorithms": lambda: _algorithms_part(settings, out, args.audio, args.quick, log),
        "triton": lambda: _triton_part(artifacts_dir, settings, out, args.quick, log,
                                      args.triton_streams, args.triton_queue_delay_us),
    }
    keys = {"position": "cost_vs_position"}
    for part in PARTS:
        if part in parts:
            bench[keys.get(part, part)] = runners[part]()
            # Saved after every part: a long run that fails late keeps what it measured.
            (out / "bench.json").write_text(json.dumps(bench, indent=1) + "\n")
    if "tensorrt" not in parts:
        bench["tensorrt"] = {"available": False, "note": "skipped (--skip tensorrt)"}
    if "triton" not in parts:
        bench["triton"] = {"available": False, "note": "skipped (--skip triton)"}
    _remeasure_peak(bench, settings, log)
    bench["targets"] = check_targets(bench)
    bench["elapsed_s"] = log.elapsed()
    (out / "bench.json").write_text(json.dumps(bench, indent=1) + "\n")
    (out / "bench.md").write_text(render_markdown(bench))
    render_plot(bench, out / "bench.png")
    _part_plots(bench, out)
    return bench


def render_saved(path: Path, out: Path) -> dict[str, Any]:
    """Re-render the markdown and plot of a saved ``bench.json`` (targets rechecked) into ``out``."""
    from echostream.bench.report import check_targets, render_markdown, render_plot

    try:
        bench = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EchoStreamError(f"cannot read {path}: {exc}") from None
    if bench.get("schema") != "echostream-bench/1":
        raise EchoStreamError(f"{path}: expected schema 'echostream-bench/1', got {bench.get('schema')!r}")
    bench["targets"] = check_targets(bench)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(path).resolve() != (out / "bench.json").resolve():
        (out / "bench.json").write_text(json.dumps(bench, indent=1) + "\n")
    (out / "bench.md").write_text(render_markdown(bench))
    render_plot(bench, out / "bench.png")
    _part_plots(bench, out)
    return bench


def _settings(args: argparse.Namespace, cores: int) -> Settings:
    quick = bool(args.quick)
    threads = args.threads or cores
    if args.tokens_per_s < 0:
        raise EchoStreamError(f"--tokens-per-s expected >= 0, got {args.tokens_per_s}")
    for name in ("threads", "repeats", "warmup", "pipeline_repeats"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise EchoStreamError(f"--{name.replace('_', '-')} expected >= "
                                  f"{0 if name == 'warmup' else 1}, got {value}")
    return Settings(
        preset=args.preset or ("tiny" if quick else "echostream"),
        threads=threads,
        repeats=args.repeats or (5 if quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        pipeline_repeats=args.pipeline_repeats or (1 if quick else 2),
        positions_s=QUICK_POSITIONS_S if quick else FULL_POSITIONS_S,
        baseline_preset="tiny (conformer)" if quick else "streamspeech",
        baseline_budget_s=args.baseline_budget_s or (10.0 if quick else 240.0),
        gemm_size=512 if quick else 2048,
        segment_ms=args.segment_ms,
        backends=["onnxruntime", "torch"],
        tokens_per_s=args.tokens_per_s,
    )


def _artifacts(args: argparse.Namespace, settings: Settings, out: Path, log) -> Path:
    """The given artifacts folder (checked against the preset), or an export of the preset
    cached under ``OUT/artifacts/<preset>``."""
    from echostream.runtime.artifacts import load_artifacts

    if args.artifacts is not None:
        artifacts = load_artifacts(args.artifacts)
        if args.preset and artifacts.name != args.preset:
            raise EchoStreamError(f"--artifacts {args.artifacts} holds preset {artifacts.name!r}, "
                                  f"but --preset {args.preset!r} was asked for")
        settings.preset = artifacts.name
        return Path(args.artifacts)
    cached = out / "artifacts" / settings.preset
    if (cached / "manifest.json").is_file():
        log(f"reusing exported artifacts {cached}")
        return cached
    from echostream.export.commands import export_artifacts

    log(f"exporting preset {settings.preset} to {cached} (once; later runs reuse it)")
    export_artifacts(cached, preset=settings.preset, force=True, progress=False, log=log)
    return cached


def _remeasure_peak(bench: dict[str, Any], settings: Settings, log) -> None:
    """Measure the GEMM peak again at the end: on a shared machine the load drifts during a long
    run, and a peak taken in a busy minute would flatter every fraction. The higher of the two
    is the peak; the fractions of peak are recomputed with it."""
    from echostream.bench.machine import gemm_peak

    log("GEMM peak again (end of run)")
    end = gemm_peak(settings.threads, settings.gemm_size, repeats=5)
    start = bench["gemm_peak"]
    best = max(start["peak_gflops"], end["peak_gflops"])
    start["end_of_run"] = {"engines": end["engines"], "peak_gflops": end["peak_gflops"],
                           "peak_engine": end["peak_engine"]}
    start["peak_gflops_start"] = start["peak_gflops"]
    start["peak_gflops"] = best
    pipe = bench.get("pipeline")
    if pipe:
        for stage in pipe["stages"].values():
            stage["fraction_of_peak"] = stage["achieved_gflops"] / best
        pipe["fraction_of_peak_in_stages"] = pipe["achieved_gflops_in_stages"] / best
        pipe["fraction_of_peak_wall"] = pipe["achieved_gflops_wall"] / best


def _graph_flops(artifacts_dir: Path) -> dict[str, Any]:
    """FLOPs and weight bytes of each stage graph, plus the bytes of state and context one call
    reads (inputs) and writes again (``next_*`` outputs) -- the traffic a step pays whatever its
    FLOPs."""
    from echostream.bench.flops import count_graph_flops
    from echostream.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(artifacts_dir, verify_hashes=False)
    out = {}
    for stage in artifacts.stages:
        entry = count_graph_flops(artifacts.stage_path(stage)).to_dict()
        contract = artifacts.contract(stage)
        entry["state_bytes_per_call"] = sum(
            2 * _nbytes(t) for t in contract.states) + sum(_nbytes(t) for t in contract.context)
        out[stage] = entry
    return out


def _nbytes(spec) -> int:
    import numpy as np

    return int(np.prod(spec.concrete_shape(1))) * np.dtype(spec.dtype).itemsize


# ---- parts ---------------------------------------------------------------------------------------------


def _position_part(artifacts_dir: Path, settings: Settings, log) -> dict[str, Any]:
    import psutil

    from echostream.bench.position import conformer_curve, emformer_curves, segment_seconds
    from echostream.runtime.artifacts import load_artifacts
    from echostream.runtime.backends import load_stage

    artifacts = load_artifacts(artifacts_dir, verify_hashes=False)
    cfg = artifacts.config
    log(f"position: EchoStream encoder on {', '.join(settings.backends)}, chained to "
        f"{settings.positions_s[-1]:g} s")
    stages = {b: load_stage(artifacts, "encoder", b, **_backend_options(b, settings))
              for b in settings.backends}
    curves = {f"echostream_{b}": c.to_dict() for b, c in emformer_curves(
        stages, cfg, settings.positions_s, settings.repeats, settings.warmup).items()}
    # The speedup is taken against an EchoStream PyTorch step timed beside each baseline call.
    torch_stage = stages.get("torch")
    feed = _encoder_feed(torch_stage) if torch_stage is not None else None
    encoder, base_cfg = _baseline_encoder(settings)
    cap = int(0.4 * psutil.virtual_memory().available)
    log(f"position: StreamSpeech prefix re-encode ({settings.baseline_preset}), budget "
        f"{settings.baseline_budget_s:.0f} s")
    curves["streamspeech_conformer_prefix"] = conformer_curve(
        encoder, base_cfg, settings.positions_s, repeats=min(settings.repeats, 3),
        warmup=1, budget_s=settings.baseline_budget_s, memory_cap_bytes=cap,
        paired=(lambda: torch_stage.run(*feed)) if feed else None).to_dict()
    return {"segment_s": segment_seconds(cfg), "baseline_preset": settings.baseline_preset,
            "baseline_memory_cap_bytes": cap, "curves": curves}


def _encoder_feed(stage) -> tuple[dict, dict]:
    """(inputs, state) for one encoder step part-way into a stream (random valid feed)."""
    from echostream.bench.stage_times import random_feed

    inputs, _, state = random_feed(stage.contract, {}, seed=0)
    return inputs, state


def _baseline_encoder(settings: Settings):
    """StreamSpeech's chunk Conformer: the ``streamspeech`` preset, or tiny dims in quick mode."""
    import torch

    from echostream.config import get_preset
    from echostream.models.conformer_encoder import ChunkConformerEncoder

    if settings.baseline_preset == "streamspeech":
        cfg = get_preset("streamspeech")
    else:
        cfg = get_preset("tiny")
        cfg.encoder = dataclasses.replace(cfg.encoder, kind="conformer", subsampling="conv1d",
                                          activation="swish", right_context=0, left_context=0,
                                          memory_size=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = ChunkConformerEncoder(cfg.encoder).eval()
    return encoder, cfg.to_dict()


def _pipeline_part(artifacts_dir: Path, settings: Settings, bench: dict[str, Any],
                   audio: Path | None, out: Path, quick: bool, log) -> dict[str, Any]:
    from echostream.bench.pipeline import summarize_runs, translate_runs
    from echostream.runtime.translator import Translator

    speech = _speech(audio, out, quick)
    log(f"pipeline: translate {speech['seconds']:.1f} s of speech x {settings.pipeline_repeats} "
        "on onnxruntime")
    translator = Translator.from_artifacts(artifacts_dir, backend="onnxruntime",
                                           segment_ms=settings.segment_ms, threads=settings.threads)
    runs = translate_runs(translator, speech["path"], settings.segment_ms,
                          settings.pipeline_repeats, warmup=1)
    flops = {s: g["flops"] for s, g in bench["graphs"].items()}
    summary = summarize_runs(runs, flops, bench["gemm_peak"]["peak_gflops"])
    summary["audio"] = {k: speech[k] for k in ("path", "seconds", "source")}
    summary["runs"] = runs
    return summary


def _speech(audio: Path | None, out: Path, quick: bool) -> dict[str, Any]:
    """The pipeline's input: ``--audio``, else espeak-ng speech (quick mode falls back to a
    synthetic voiced signal when espeak-ng is missing, and says so)."""
    import soundfile as sf

    if audio is not None:
        info = sf.info(str(audio))
        return {"path": str(audio), "seconds": info.frames / info.samplerate, "source": "given"}
    from echostream.bench.speech import synthesize_speech, synthetic_voice

    try:
        speech = synthesize_speech(out / "speech.wav")
        speech["source"] = "espeak-ng"
    except RuntimeError:
        if not quick:
            raise
        speech = synthetic_voice(out / "speech.wav")
    return speech


def _tuning_part(artifacts_dir: Path, settings: Settings, audio: Path | None, out: Path,
                 quick: bool, log) -> dict[str, Any]:
    from echostream.bench.tuning import SPINNING, measure_variants

    speech = _speech(audio, out, quick)
    log(f"tuning: translate at 1 / {settings.threads} threads, {SPINNING} on / off")
    # One run per variant, no warm-up: four more full passes are already the bench's longest part.
    variants = measure_variants(str(artifacts_dir), speech["path"], settings.segment_ms,
                                settings.threads, repeats=1, warmup=0)
    return {"setting": SPINNING, "variants": variants}


def _backends_part(artifacts_dir: Path, settings: Settings, log) -> dict[str, Any]:
    from echostream.bench.stage_times import compare_backends
    from echostream.runtime.artifacts import load_artifacts
    from echostream.runtime.backends import load_stages

    artifacts = load_artifacts(artifacts_dir, verify_hashes=False)
    log(f"backends: {len(artifacts.stages)} stages on {', '.join(settings.backends)}")
    stages = {b: load_stages(artifacts, b, **_backend_options(b, settings)) for b in settings.backends}
    results = compare_backends(stages, artifacts.config, settings.repeats, settings.warmup)
    return _with_ratios(results)


def _with_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for entry in results.values():
        if "onnxruntime" in entry and "torch" in entry:
            entry["ratio_onnxruntime_over_torch"] = (entry["onnxruntime"]["median_s"]
                                                     / entry["torch"]["median_s"])
            # Best case of each: least disturbed by other processes on a shared machine.
            entry["ratio_min_onnxruntime_over_torch"] = (entry["onnxruntime"]["min_s"]
                                                         / entry["torch"]["min_s"])
    return results


def _memory_part(artifacts_dir: Path, settings: Settings, bench: dict[str, Any],
                 audio: Path | None, out: Path, quick: bool, log) -> dict[str, Any]:
    from echostream.bench.memory import translate_peak_rss

    speech = _speech(audio, out, quick)
    log("memory: translate in a fresh process")
    mem = translate_peak_rss(artifacts_dir, speech["path"], settings.threads, settings.segment_ms)
    weights = sum(g["weight_bytes"] for g in bench["graphs"].values())
    mem["weights_bytes"] = weights
    mem["weights_what"] = "sum of the initializers of every fp32 stage graph"
    mem["ratio"] = mem["peak_rss_bytes"] / weights
    return mem


def _tensorrt_part(artifacts_dir: Path, settings: Settings, bench: dict[str, Any], log) -> dict[str, Any]:
    """TensorRT stage times (added to the backend table) and pipeline RTF, when it can run."""
    from echostream.bench.pipeline import summarize_runs, translate_runs
    from echostream.bench.stage_times import time_stage
    from echostream.runtime.artifacts import load_artifacts
    from echostream.runtime.backends import load_stages
    from echostream.runtime.translator import Translator

    try:
        artifacts = load_artifacts(artifacts_dir, verify_hashes=False)
        stages = load_stages(artifacts, "tensorrt")
    except (BackendUnavailable, EchoStreamError, ImportError, OSError) as exc:
        return {"available": False, "note": str(exc).splitlines()[0]}
    log("tensorrt: stage times and pipeline")
    for name, stage in stages.items():
        timing = time_stage(stage, artifacts.config, settings.repeats, settings.warmup)
        bench.setdefault("backends", {}).setdefault(name, {})["tensorrt"] = timing.to_dict()
    if "tensorrt" not in settings.backends:
        settings.backends.append("tensorrt")
        bench["settings"]["backends"] = list(settings.backends)
    result: dict[str, Any] = {"available": True, "gpu": bench["machine"]["gpu"]}
    pipe = bench.get("pipeline")
    if pipe:
        translator = Translator(stages, artifacts.config, *_vocabs(artifacts), artifacts.cmvn_mean,
                                artifacts.cmvn_std, settings.segment_ms)
        runs = translate_runs(translator, pipe["audio"]["path"], settings.segment_ms,
                              settings.pipeline_repeats, warmup=1)
        summary = summarize_runs(runs, {s: g["flops"] for s, g in bench["graphs"].items()},
                                 bench["gemm_peak"]["peak_gflops"])
        result["rtf"] = summary["rtf"]["median_s"]
        result["pipeline"] = summary
    return result


def _streams_part(artifacts_dir: Path, settings: Settings, bench: dict[str, Any], out: Path,
                  quick: bool, log) -> dict[str, Any]:
    from echostream.bench.streams import (added_rss_per_stream, held_state_per_stream,
                                          memory_per_stream, run_streams, speech_pool,
                                          state_bytes_per_stream, trained_length_policy)
    from echostream.runtime.artifacts import load_artifacts
    from echostream.runtime.translator import Translator

    counts = QUICK_STREAM_COUNTS if quick else FULL_STREAM_COUNTS
    pool = speech_pool(out / "speakers", 4 if quick else 8, quick)
    artifacts = load_artifacts(artifacts_dir, verify_hashes=False)
    policy = trained_length_policy(pool, settings.tokens_per_s)
    translator = Translator.from_loaded(artifacts, "onnxruntime", settings.segment_ms, policy,
                                        threads=settings.threads)
    flops = {s: g["flops"] for s, g in bench["graphs"].items()}
    peak = bench["gemm_peak"]["peak_gflops"]
    run_streams(translator, pool, 1, 1, flops, peak)  # warm-up: first calls allocate
    rows = []
    for n in counts:
        log(f"streams: {n} concurrent speaker(s), staggered by one segment")
        rows.append(run_streams(translator, pool, n, 1, flops, peak))
    mem_counts = [1, 4] if quick else [1, 4, 16]
    log(f"streams: peak RSS of {', '.join(map(str, mem_counts))} streams in fresh processes")
    memory = memory_per_stream(artifacts_dir, mem_counts, settings.threads,
                               seconds=2.0 if quick else 6.0)
    return {"counts": counts, "runs": rows, "memory": memory,
            "state_bytes_per_stream": held_state_per_stream(memory),
            "state_bytes_bound_per_stream": state_bytes_per_stream(artifacts),
            "added_rss_per_stream_bytes": added_rss_per_stream(memory),
            "speakers": len(pool), "stagger_segments": 1, "threads": settings.threads,
            "final_max_len": translator.policy_config.final_max_len,
            "tokens_per_s": settings.tokens_per_s}


def _triton_part(artifacts_dir: Path, settings: Settings, out: Path, quick: bool,
                 log, counts: list[int] | None = None,
                 queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> dict[str, Any]:
    from echostream.bench.streams import speech_pool
    from echostream.bench.triton import available, triton_streams

    why = available()
    if why is not None:
        log(f"triton: skipped: {why}")
        return {"available": False, "note": why}
    pool = speech_pool(out / "speakers", 4 if quick else 8, quick)
    counts = counts or (QUICK_STREAM_COUNTS if quick else FULL_TRITON_COUNTS)
    if min(counts) < 1:
        raise EchoStreamError(f"--triton-streams expected counts >= 1, got {counts}")
    if queue_delay_us < 0:
        raise EchoStreamError(f"--triton-queue-delay-us expected >= 0, got {queue_delay_us}")
    return triton_streams(artifacts_dir, pool, counts, settings.threads, settings.segment_ms, log,
                          queue_delay_us)


def _algorithms_part(settings: Settings, out: Path, audio: Path | None, quick: bool,
                     log) -> dict[str, Any]:
    import soundfile as sf

    from echostream.bench.algorithms import compare_algorithms
    from echostream.runtime.audio import StreamingResampler
    from echostream.runtime.translator import Translator

    preset = "streamspeech_tiny" if quick else "streamspeech"
    folder = out / "artifacts" / preset
    if not (folder / "manifest.json").is_file():
        from echostream.export.commands import export_artifacts

        log(f"algorithms: exporting preset {preset} with its sentence graphs to {folder} (once)")
        export_artifacts(folder, preset=preset, force=True, progress=False, log=log,
                         sentence_graphs=True)
    speech = _speech(audio, out, quick)
    samples, rate = sf.read(speech["path"], dtype="float32")
    resampler = StreamingResampler(rate, 16000)
    audio16 = np.concatenate([resampler.process(samples), resampler.flush()])
    if quick:
        audio16 = audio16[:6 * 16000]

    def make(backend: str, fidelity: str):
        options = {"threads": settings.threads} if backend == "onnxruntime" else {}
        return Translator.from_artifacts(folder, backend=backend, segment_ms=320,
                                         fidelity=fidelity, **options)

    curves = compare_algorithms(make, audio16, 20.0 if quick else settings.baseline_budget_s, log)
    return {"preset": preset, "audio_s": len(audio16) / 16000.0, "segment_ms": 320,
            "curves": curves}


def _part_plots(bench: dict[str, Any], out: Path) -> None:
    """The plots of the parts that have their own figure: streams.png, triton.png."""
    from echostream.bench.streams import render_streams_plot
    from echostream.bench.triton import render_triton_plot

    render_streams_plot(bench.get("streams") or {}, out / "streams.png")
    render_triton_plot(bench.get("triton") or {}, out / "triton.png")


def _windows_part(artifacts_dir: Path, settings: Settings, log) -> dict[str, Any]:
    from echostream.bench.windows import window_costs
    from echostream.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(artifacts_dir, verify_hashes=False)
    return window_costs(artifacts, settings.threads, settings.repeats, settings.warmup, log)


def _vocabs(artifacts):
    from echostream.runtime.translator import _vocabulary

    return _vocabulary(artifacts, "src"), _vocabulary(artifacts, "tgt")


def _backend_options(backend: str, settings: Settings) -> dict[str, Any]:
    return {"threads": settings.threads} if backend == "onnxruntime" else {}


# ---- helpers ---------------------------------------------------------------------------------------------


def _command_line(args: argparse.Namespace, artifacts_dir: Path) -> str:
    parts = ["echostream bench", "--quick" if args.quick else "", f"--artifacts {artifacts_dir}",
             f"--out {args.out}"]
    for name in ("threads", "repeats", "warmup", "pipeline_repeats", "baseline_budget_s"):
        value = getattr(args, name)
        if value is not None:
            parts.append(f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float)
                         else f"--{name.replace('_', '-')} {value}")
    if args.audio:
        parts.append(f"--audio {args.audio}")
    if args.segment_ms != 320:
        parts.append(f"--segment-ms {args.segment_ms}")
    if getattr(args, "triton_streams", None):
        parts.append("--triton-streams " + " ".join(str(n) for n in args.triton_streams))
    if getattr(args, "triton_queue_delay_us", DEFAULT_QUEUE_DELAY_US) != DEFAULT_QUEUE_DELAY_US:
        parts.append(f"--triton-queue-delay-us {args.triton_queue_delay_us}")
    if args.skip:
        parts.append("--skip " + " ".join(args.skip))
    return " ".join(p for p in parts if p)


class _Log:
    """Progress lines on stderr with the seconds since the bench started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[bench {self.elapsed():7.1f} s] {message}", file=sys.stderr, flush=True)

