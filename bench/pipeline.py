"""Whole-pipeline compute: real-time factor of ``translate``, per-stage time, FLOPs and FLOP/s.

The run is exactly ``echostream translate``'s (``translate_file``: the file fed one policy segment
at a time, decoded after every block). The translator's per-stream :class:`StageClock` counts the
calls each stage made and the seconds spent in them; ``other`` is what the stages do not account
for (resampling, fbank, CTC collapses, the policy, Python glue).

FLOPs per stage per second of audio = (FLOPs of one call, counted from the graph) x (calls the run
*actually made*, from the clock) / audio seconds. Achieved FLOP/s = the same FLOPs / the stage's
measured seconds, and its fraction of the GEMM peak measured in the same run says how far each
stage is from the machine's compute limit.
"""
from __future__ import annotations

import statistics
from typing import Any, Mapping

from .timing import Timing


def translate_runs(translator, audio_path: str, segment_ms: int, repeats: int,
                   warmup: int) -> list[dict[str, Any]]:
    """``warmup`` untimed + ``repeats`` timed ``translate_file`` runs of ``audio_path``.

    Returns:
        per timed run: ``{"wall_s", "source_s", "rtf", "stages": {stage: {"calls", "seconds"}},
        "events", "translation_tokens", "speech_samples"}``.
    """
    from echostream.runtime.audio import scan_audio
    from echostream.runtime.translate_cli import translate_file

    info = scan_audio(audio_path)
    runs = []
    for i in range(warmup + repeats):
        run = translate_file(translator, info, segment_ms)
        if i < warmup:
            continue
        wall_s = run.wall_ms[-1] / 1000.0 if run.wall_ms else 0.0
        source_s = run.source_ms / 1000.0
        end = run.end
        runs.append({
            "wall_s": wall_s, "source_s": source_s, "rtf": wall_s / source_s,
            "stages": run.stage_clock, "events": len(run.events),
            "translation_tokens": len(end.translation_ids) if end else 0,
            "speech_samples": int(sum(e.num_samples for e, _ in run.of_kind("speech"))),
        })
    return runs


def summarize_runs(runs: list[dict[str, Any]], graph_flops: Mapping[str, int],
                   peak_gflops: float) -> dict[str, Any]:
    """Median RTF, per-stage time / calls / FLOPs / FLOP/s / fraction of peak over the runs.

    Args:
        runs: :func:`translate_runs` output (every run must have made the same calls).
        graph_flops: stage -> FLOPs of one call (``bench.flops``).
        peak_gflops: the machine's measured fp32 GEMM peak at the same thread count.
    """
    source_s = runs[0]["source_s"]
    walls = [r["wall_s"] for r in runs]
    stages: dict[str, Any] = {}
    for name in runs[0]["stages"]:
        seconds = [r["stages"][name]["seconds"] for r in runs]
        calls = runs[0]["stages"][name]["calls"]
        flops = graph_flops.get(name, 0) * calls
        median = statistics.median(seconds)
        gflops = flops / median / 1e9 if median > 0 else 0.0
        stages[name] = {
            "calls": calls, "calls_per_audio_s": calls / source_s,
            "seconds": Timing.of(seconds).to_dict(),
            "ms_per_call": 1000.0 * median / calls if calls else 0.0,
            "share_of_wall": median / statistics.median(walls),
            "flops_per_call": graph_flops.get(name, 0),
            "gflop_per_audio_s": flops / source_s / 1e9,
            "achieved_gflops": gflops, "fraction_of_peak": gflops / peak_gflops,
        }
    stage_total = [sum(r["stages"][n]["seconds"] for n in r["stages"]) for r in runs]
    total_flops = sum(graph_flops.get(n, 0) * s["calls"] for n, s in stages.items())
    wall = statistics.median(walls)
    return {
        "source_s": source_s,
        "wall_s": Timing.of(walls).to_dict(),
        "rtf": Timing.of([r["rtf"] for r in runs]).to_dict(),
        "other_s": max(0.0, wall - statistics.median(stage_total)),
        "stages": stages,
        "gflop_per_audio_s": total_flops / source_s / 1e9,
        "achieved_gflops_in_stages": total_flops / statistics.median(stage_total) / 1e9,
        "achieved_gflops_wall": total_flops / wall / 1e9,
        "fraction_of_peak_in_stages": total_flops / statistics.median(stage_total) / 1e9 / peak_gflops,
        "fraction_of_peak_wall": total_flops / wall / 1e9 / peak_gflops,
        "calls_consistent": all(
            r["stages"][n]["calls"] == runs[0]["stages"][n]["calls"] for r in runs for n in stages),
        "translation_tokens": runs[0]["translation_tokens"],
        "speech_samples": runs[0]["speech_samples"],
    }
