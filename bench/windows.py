"""What windows that hold a sentence cost (issue 10): per-stage ms per call and state bytes per
stream, the pre-fidelity windows against the sentence-capacity windows, in one run.

Before the fidelity work the decoder-side windows slid inside a sentence: the ST CTC layers saw
32 frames, the T2U encoder and the unit cross-attention 64 text states, the unit self-attention
400 positions (16 text states). Now every window is derived from the sentence capacity
(``sentence.max_source_frames``, ``sentence.max_target_tokens``). The MT decoder's windows were
already 750 frames / 128 tokens and did not change.

The "before" graphs are exported from the same weights with the old window sizes (the unit
self-attention of 400 positions is ``max_target_tokens = 16`` text states; the T2U and cross
caches then hold 16 states instead of the old 64, a few hundred KiB of difference that the unit
self-attention cache dwarfs), timed on ONNX Runtime interleaved with the current graphs so both
see the same machine load.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from echostream.contract import StageContract, stage_contract

from .stage_times import random_feed
from .timing import Timing

CHANGED_STAGES = ("st_ctc", "unit_decoder")
BEFORE_SOURCE_FRAMES = 32  # the old ``ctc.st_left_context``
BEFORE_TEXT_STATES = 16  # the old unit self-attention: 400 positions = 16 text states x 25


def state_bytes(contract: StageContract) -> int:
    """Bytes of one stream's state of a stage (batch 1)."""
    return sum(int(np.prod(s.concrete_shape(1))) * np.dtype(s.dtype).itemsize
               for s in contract.states)


def before_config(cfg) -> Any:
    """The same model config with the pre-fidelity window sizes of the changed stages."""
    out = dataclasses.replace(cfg)
    out.sentence = dataclasses.replace(cfg.sentence, max_source_frames=BEFORE_SOURCE_FRAMES,
                                       max_target_tokens=BEFORE_TEXT_STATES)
    return out


def window_costs(artifacts, threads: int, repeats: int, warmup: int,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Time the changed stages with the old and the current windows (ONNX Runtime)."""
    from echostream.export.onnx_export import export_stage
    from echostream.export.torch_backend import load_reference_model
    from echostream.runtime.backends import load_stage
    from echostream.runtime.onnxruntime_backend import OrtStage

    model = load_reference_model(artifacts)
    old_cfg = before_config(model.cfg)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="echostream-windows-") as tmp:
        for stage in CHANGED_STAGES:
            log(f"windows: exporting {stage} with the pre-fidelity windows")
            old_model = _with_config(model, old_cfg)
            path = Path(tmp) / f"{stage}.onnx"
            export_stage(old_model, stage, path)
            old_contract = stage_contract(stage, old_cfg.to_dict())
            stages = {"before": OrtStage(path, old_contract, threads=threads),
                      "after": load_stage(artifacts, stage, "onnxruntime", threads=threads)}
            timings = _interleaved(stages, artifacts.config, repeats, warmup)
            results[stage] = {
                "ms_per_call": {k: 1000 * t.median_s for k, t in timings.items()},
                "timing": {k: t.to_dict() for k, t in timings.items()},
                "state_bytes": {"before": state_bytes(old_contract),
                                "after": state_bytes(artifacts.contract(stage))},
            }
    return {"stages": results,
            "before": {"max_source_frames": BEFORE_SOURCE_FRAMES,
                       "unit_text_states": BEFORE_TEXT_STATES},
            "after": dict(artifacts.config["sentence"])}


def _with_config(model, cfg):
    """A reference model with ``cfg``'s windows and ``model``'s weights (windows have no weights)."""
    from echostream.models.weights import build_model

    other = build_model(cfg)
    other.load_state_dict(model.state_dict())
    return other.eval()


def _interleaved(stages: dict[str, Any], cfg, repeats: int, warmup: int) -> dict[str, Timing]:
    feeds = {k: random_feed(s.contract, cfg) for k, s in stages.items()}
    calls = {k: (lambda s=s, f=feeds[k]: s.run(f[0], f[2], f[1])) for k, s in stages.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(repeats):
        for k, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[k].append(time.perf_counter() - start)
    return {k: Timing.of(v) for k, v in seconds.items()}
