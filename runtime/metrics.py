"""Latency metrics with SimulEval's definitions (the numbers StreamSpeech reports), as pure functions.

Everything is in milliseconds of *source* time. A text output is a list of ``delays``: for each
emitted target token, how much source audio had been consumed when it was emitted. A speech output
is a list of ``(delay, duration)`` segments: the source time at which each chunk of translated
speech was emitted and how long it plays.

Definitions (SimulEval ``evaluator/scorers/latency_scorer.py`` and ``evaluator/instance.py``, as
in StreamSpeech's fork; ``streamspeech-facts.md`` §9):

- **AL** (Ma et al. 2019, STACL), SimulEval's variant::

      AL = 1/tau * sum_{i=1..tau} ( d_i - (i - 1) * |X| / |Y| )

  with ``|X|`` the source length (ms), ``|Y|`` the target length (the hypothesis length unless a
  reference length is given), ``tau`` the first index with ``d_i >= |X|`` (inclusive; all tokens if
  none), and ``AL = d_1`` when the first delay already exceeds ``|X|``.
- **StartOffset** = ``d_1``; **EndOffset** = ``d_last - |X|``.
- **Speech output**: segments are laid on the target (listening) timeline: the first starts at its
  delay, each next one at ``max(end of previous, its delay)``; a gap is a *discontinuity*
  (silence inserted while waiting for the source). AL and StartOffset use the segment delays;
  EndOffset uses the end of the last segment on that timeline; SimulEval's "RTF" is that end
  divided by ``|X|`` (an output-timeline ratio, not compute speed).
- **Computation-aware** (``_CA``): SimulEval's ``elapsed`` = delay + wall-clock time spent
  computing up to the emission; the same formulas on those delays (SimulEval computes the speech
  EndOffset from the non-CA timeline; ours lays the CA delays on the timeline, which is what a
  listener of a real-time system would hear).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

Segment = tuple[float, float]  # (delay_ms, duration_ms)


def _check_delays(delays: Sequence[float], source_length: float | None = None) -> None:
    if len(delays) == 0:
        raise ValueError("latency needs at least one delay, got an empty list")
    if any(not math.isfinite(d) or d < 0 for d in delays):
        raise ValueError(f"delays must be finite and >= 0 ms, got {list(delays)}")
    if source_length is not None and not (math.isfinite(source_length) and source_length > 0):
        raise ValueError(f"source length must be > 0 ms, got {source_length}")


def average_lagging(delays: Sequence[float], source_length: float,
                    target_length: float | None = None) -> float:
    """SimulEval AL.

    Args:
        delays: [|Y|] ms of source consumed when each target unit was emitted (non-decreasing).
        source_length: |X|, the source duration in ms.
        target_length: reference length; None = ``len(delays)`` (SimulEval without a reference).
    Returns:
        AL in ms.
    """
    _check_delays(delays, source_length)
    if delays[0] > source_length:
        return float(delays[0])
    length = len(delays) if target_length is None else target_length
    if length <= 0:
        raise ValueError(f"target length must be > 0, got {length}")
    rate = source_length / length  # ms of source per target unit on the ideal diagonal
    total, tau = 0.0, 0
    for i, d in enumerate(delays):
        total += d - i * rate
        tau = i + 1
        if d >= source_length:  # tau: first unit emitted once the whole source was read
            break
    return total / tau


def start_offset(delays: Sequence[float]) -> float:
    """SimulEval StartOffset: the first delay (ms)."""
    _check_delays(delays)
    return float(delays[0])


def end_offset(delays: Sequence[float], source_length: float) -> float:
    """SimulEval EndOffset for text: last delay minus the source length (ms)."""
    _check_delays(delays, source_length)
    return float(delays[-1]) - source_length


def computation_aware(delays: Sequence[float], compute_ms: Sequence[float]) -> list[float]:
    """SimulEval ``elapsed``: each delay plus the compute time elapsed up to that emission.

    Args:
        delays: [n] source ms at emission.
        compute_ms: [n] cumulative wall-clock compute ms when each unit was emitted.
    Returns:
        [n] computation-aware delays.
    """
    if len(delays) != len(compute_ms):
        raise ValueError(f"need one compute time per delay: {len(delays)} delays, "
                         f"{len(compute_ms)} compute times")
    return [float(d) + float(c) for d, c in zip(delays, compute_ms)]


# ---- speech output ------------------------------------------------------------------------------


def speech_intervals(segments: Sequence[Segment]) -> list[Segment]:
    """Lay speech segments on the listening timeline (SimulEval ``SpeechOutputInstance.summarize``).

    Args:
        segments: [n] (delay_ms, duration_ms) in emission order.
    Returns:
        [n] (start_ms, duration_ms): start = max(end of the previous segment, delay), the first
        starting at its own delay.
    """
    _check_segments(segments)
    intervals: list[Segment] = []
    prev_end = float(segments[0][0])
    for delay, duration in segments:
        start = max(prev_end, float(delay))
        intervals.append((start, float(duration)))
        prev_end = start + duration
    return intervals


def speech_discontinuities(segments: Sequence[Segment]) -> list[float]:
    """Silences (ms) inserted on the timeline while waiting for the source (each > 0)."""
    gaps, prev_end = [], None
    for start, duration in speech_intervals(segments):
        if prev_end is not None and start > prev_end:
            gaps.append(start - prev_end)
        prev_end = start + duration
    return gaps


def speech_end_offset(segments: Sequence[Segment], source_length: float) -> float:
    """SimulEval EndOffset for speech: end of the last segment on the timeline minus |X| (ms)."""
    _check_delays([s[0] for s in segments], source_length)
    start, duration = speech_intervals(segments)[-1]
    return start + duration - source_length


def speech_timeline_ratio(segments: Sequence[Segment], source_length: float) -> float:
    """SimulEval's speech "RTF": end of the last segment on the timeline / |X|."""
    return (speech_end_offset(segments, source_length) + source_length) / source_length


def speech_aligned_delays(segments: Sequence[Segment], word_times_ms: Sequence[float]) -> list[float]:
    """SimulEval ``*_SpeechAlign_*`` delays from word times found in the output audio.

    SimulEval writes the output wav starting at the first segment's delay, silences included, and
    forced-aligns words in it; a word at ``t`` ms into that wav has delay ``d_1 + t``.

    Args:
        segments: [n] (delay_ms, duration_ms), to take ``d_1``.
        word_times_ms: [w] word boundaries (begin, end or centre) in the output wav, in ms.
    Returns:
        [w] delays on the source clock, to feed :func:`average_lagging` etc.
    """
    _check_segments(segments)
    return [float(segments[0][0]) + float(t) for t in word_times_ms]


def _check_segments(segments: Sequence[Segment]) -> None:
    if len(segments) == 0:
        raise ValueError("speech latency needs at least one segment, got none")
    for delay, duration in segments:
        if not (math.isfinite(delay) and delay >= 0 and math.isfinite(duration) and duration >= 0):
            raise ValueError(f"segments must be (delay >= 0, duration >= 0) ms, got ({delay}, {duration})")


# ---- one report for a translated utterance -------------------------------------------------------


def text_latency(delays: Sequence[float], source_length: float,
                 compute_ms: Sequence[float] | None = None,
                 reference_length: float | None = None) -> dict[str, Any]:
    """AL / StartOffset / EndOffset (and ``_CA`` variants when ``compute_ms`` is given).

    Returns a dict of floats, or of None when nothing was emitted (SimulEval skips such instances).
    """
    keys = ("AL", "StartOffset", "EndOffset")
    report: dict[str, Any] = {"count": len(delays)}
    ca = compute_ms is not None
    if not delays:
        report.update({k: None for k in keys})
        report.update({f"{k}_CA": None for k in keys} if ca else {})
        return report
    report.update(_text_scores(delays, source_length, reference_length, ""))
    if ca:
        elapsed = computation_aware(delays, compute_ms)
        report.update(_text_scores(elapsed, source_length, reference_length, "_CA"))
    return report


def speech_latency(segments: Sequence[Segment], source_length: float,
                   compute_ms: Sequence[float] | None = None) -> dict[str, Any]:
    """AL / StartOffset / EndOffset / RTF / discontinuities of a speech output (+ ``_CA``).

    AL uses one delay per segment with |Y| = number of segments (SimulEval's plain ``AL`` on a
    speech output, no forced alignment). Returns Nones when no speech was emitted.
    """
    keys = ("AL", "StartOffset", "EndOffset", "RTF")
    report: dict[str, Any] = {"segments": len(segments),
                              "duration_ms": float(sum(d for _, d in segments))}
    ca = compute_ms is not None
    if not segments:
        report.update({k: None for k in keys})
        report.update({"DiscontinuitySum": None, "DiscontinuityAve": None, "DiscontinuityNum": 0})
        report.update({f"{k}_CA": None for k in keys} if ca else {})
        return report
    report.update(_speech_scores(segments, source_length, ""))
    gaps = speech_discontinuities(segments)
    report.update({"DiscontinuitySum": float(sum(gaps)),
                   "DiscontinuityAve": float(sum(gaps) / len(gaps)) if gaps else 0.0,
                   "DiscontinuityNum": len(gaps)})
    if ca:
        elapsed = computation_aware([d for d, _ in segments], compute_ms)
        ca_segments = [(e, d) for e, (_, d) in zip(elapsed, segments)]
        report.update(_speech_scores(ca_segments, source_length, "_CA"))
    return report


def _text_scores(delays: Sequence[float], source_length: float,
                 reference_length: float | None, suffix: str) -> dict[str, float]:
    return {f"AL{suffix}": average_lagging(delays, source_length, reference_length),
            f"StartOffset{suffix}": start_offset(delays),
            f"EndOffset{suffix}": end_offset(delays, source_length)}


def _speech_scores(segments: Sequence[Segment], source_length: float,
                   suffix: str) -> dict[str, float]:
    delays = [d for d, _ in segments]
    return {f"AL{suffix}": average_lagging(delays, source_length),
            f"StartOffset{suffix}": start_offset(delays),
            f"EndOffset{suffix}": speech_end_offset(segments, source_length),
            f"RTF{suffix}": speech_timeline_ratio(segments, source_length)}
