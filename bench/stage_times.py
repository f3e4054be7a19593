"""Per-stage step time on each backend, through the runtime's own ``Stage`` interface.

Both backends are timed the way the translator calls them (``Stage.run`` with host numpy in and
out, feed checks included), at the same thread count, on the same random-but-valid feed: N(0, 1)
data and caches, in-range token / unit ids, counters part-way into a stream (so the masks are
neither all-open nor all-closed).
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from echostream.contract import INT32, StageContract, integer_range

from .timing import Timing, time_calls

COUNTER = 12  # steps already taken: caches part full, a realistic mask


def random_feed(contract: StageContract, cfg: Mapping[str, Any], seed: int = 0,
                counter: int = COUNTER) -> tuple[dict, dict | None, dict | None]:
    """(inputs, context, state) for one batch-1 call of ``contract``'s stage, as host arrays."""
    rng = np.random.default_rng(seed)

    def make(specs, data: bool = False):
        out = {}
        for spec in specs:
            shape = spec.concrete_shape(1)
            if spec.dtype == INT32:
                if not data:  # a counter
                    out[spec.name] = np.full(shape, counter, dtype=np.int32)
                else:
                    low, high = integer_range(contract.stage, cfg, spec.name)
                    out[spec.name] = rng.integers(low, high, size=shape, dtype=np.int32)
            else:
                out[spec.name] = rng.standard_normal(shape, dtype=np.float32)
        return out

    inputs = make(contract.data_inputs, data=True)
    context = make(contract.context) if contract.context else None
    state = make(contract.states) if contract.states else None
    return inputs, context, state


def time_stage(stage, cfg: Mapping[str, Any], repeats: int, warmup: int, seed: int = 0) -> Timing:
    """Median/min/max seconds of one ``stage.run`` on a fixed random feed."""
    inputs, context, state = random_feed(stage.contract, cfg, seed)
    return time_calls(lambda: stage.run(inputs, state, context), repeats, warmup)


def compare_backends(stages_by_backend: Mapping[str, Mapping[str, Any]], cfg: Mapping[str, Any],
                     repeats: int, warmup: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Time every stage on every backend, *interleaved*: each round runs the stage once on every
    backend, so both see the same machine load (on a shared machine, timing one backend's calls
    after the other's compares two different minutes of the machine, not two backends).

    Args:
        stages_by_backend: backend name -> stage name -> ``Stage``.
    Returns:
        stage -> {backend -> Timing dict, ...}; the per-stage ratios are the report's business.
    """
    backends = list(stages_by_backend)
    names = [n for n in next(iter(stages_by_backend.values()))
             if all(n in stages_by_backend[b] for b in backends)]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        stage0 = stages_by_backend[backends[0]][name]
        inputs, context, state = random_feed(stage0.contract, cfg, seed)
        calls = {b: (lambda st=stages_by_backend[b][name]: st.run(inputs, state, context))
                 for b in backends}
        for call in calls.values():
            for _ in range(warmup):
                call()
        seconds: dict[str, list[float]] = {b: [] for b in backends}
        for _ in range(repeats):
            for b, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[b].append(time.perf_counter() - start)
        results[name] = {b: Timing.of(seconds[b]).to_dict() for b in backends}
    return results
