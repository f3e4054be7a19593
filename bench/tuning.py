"""ONNX Runtime settings that move the pipeline's real-time factor: threads and thread spinning.

The translator keeps one ``InferenceSession`` per stage (seven), each with its own intra-op thread
pool. By default ORT's pool threads *spin* after each op waiting for the next one; with seven pools
that is up to seven busy-waiting threads, which on a 2-core machine (worse: a shared one) steal the
cores the active stage needs. This part measures ``translate`` with each combination of thread
count and ``session.intra_op.allow_spinning`` so the report can say which setting the runtime
should default to, with numbers.

The runtime's ``session_options`` turns spinning off (this measurement is why); the variants are
applied by wrapping it for the duration of one measurement (``session_config``), so nothing
outside this benchmark sees them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

SPINNING = "session.intra_op.allow_spinning"


@contextlib.contextmanager
def session_config(entries: Mapping[str, str]) -> Iterator[None]:
    """Sessions created inside the block get ``entries`` as ORT session config entries."""
    import echostream.runtime.onnxruntime_backend as backend

    original = backend.session_options

    def tuned(threads: int | None = None, deterministic: bool = False):
        opts = original(threads, deterministic, allow_spinning=entries.get(SPINNING) == "1")
        for key, value in entries.items():
            if key != SPINNING:
                opts.add_session_config_entry(key, value)
        return opts

    backend.session_options = tuned
    try:
        yield
    finally:
        backend.session_options = original


def tuning_variants(threads: int) -> list[dict[str, Any]]:
    """(threads, spinning) combinations: 1 thread and ``threads``, spinning on (ORT's default)
    and off."""
    counts = sorted({1, threads})
    return [{"threads": t, "spinning": spin} for t in counts for spin in (True, False)]


def measure_variants(artifacts_dir: str, audio_path: str, segment_ms: int, threads: int,
                     repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Pipeline RTF for every variant (``warmup`` untimed + ``repeats`` timed runs each).

    Returns:
        per variant ``{"threads", "spinning", "rtf": Timing dict, "stage_ms_per_call": {...}}``.
    """
    from echostream.runtime.translator import Translator

    from .pipeline import translate_runs
    from .timing import Timing

    results = []
    for variant in tuning_variants(threads):
        entries = {SPINNING: "1" if variant["spinning"] else "0"}
        with session_config(entries):
            translator = Translator.from_artifacts(artifacts_dir, backend="onnxruntime",
                                                   segment_ms=segment_ms, threads=variant["threads"])
        runs = translate_runs(translator, audio_path, segment_ms, repeats, warmup)
        last = runs[-1]["stages"]
        results.append({
            **variant, "rtf": Timing.of([r["rtf"] for r in runs]).to_dict(),
            "stage_ms_per_call": {s: 1000.0 * v["seconds"] / v["calls"]
                                  for s, v in last.items() if v["calls"]},
        })
    return results
