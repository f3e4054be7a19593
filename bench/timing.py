"""Timing primitives shared by every benchmark: warm-up then repeated runs, min/median/max.

A benchmark never reports a single run: the first calls of a session pay for lazy allocation,
kernel selection and cache warm-up, and on a shared machine single runs are noisy. So each
measurement is ``warmup`` untimed calls followed by ``repeats`` timed ones, summarised by
min/median/max (the median is the headline; the spread shows how noisy the machine was).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Timing:
    """Seconds of ``n`` timed calls: min, median, max."""

    min_s: float
    median_s: float
    max_s: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        if not seconds:
            raise ValueError("Timing.of needs at least one measurement, got none")
        return cls(min(seconds), statistics.median(seconds), max(seconds), len(seconds))

    def to_dict(self) -> dict[str, Any]:
        return {"min_s": self.min_s, "median_s": self.median_s, "max_s": self.max_s, "n": self.n}

    def scaled(self, factor: float) -> "Timing":
        """The same statistics divided by ``factor`` (e.g. per call when one timing covered many)."""
        return Timing(self.min_s / factor, self.median_s / factor, self.max_s / factor, self.n)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed one by one."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats expected >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Timing.of(seconds)


def time_budgeted(fn: Callable[[], Any], repeats: int, warmup: int, budget_s: float) -> Timing:
    """Like :func:`time_calls`, but stop early (after at least one timed call) once ``budget_s``
    seconds have gone into this measurement -- for calls that may take many seconds each."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - start > budget_s:
            break
    seconds: list[float] = []
    while len(seconds) < repeats:
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return Timing.of(seconds)
