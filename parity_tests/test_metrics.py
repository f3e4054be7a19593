"""SimulEval latency definitions on hand-computed examples (all values in ms)."""
from __future__ import annotations

import pytest

from echostream.runtime.metrics import (
    average_lagging,
    computation_aware,
    end_offset,
    speech_aligned_delays,
    speech_discontinuities,
    speech_end_offset,
    speech_intervals,
    speech_latency,
    speech_timeline_ratio,
    start_offset,
    text_latency,
)


def test_al_stops_at_first_delay_reaching_the_source_end():
    # |X| = 1000, |Y| = 4 -> 250 ms of source per token on the diagonal.
    # terms: 200 - 0, 400 - 250, 1000 - 500 (d >= |X|: tau = 3, the 4th token is not counted)
    assert average_lagging([200, 400, 1000, 1000], 1000) == pytest.approx((200 + 150 + 500) / 3)


def test_al_uses_all_tokens_when_none_reaches_the_end():
    # |Y| = 3, 300 ms per token: 100, 400 - 300, 700 - 600 -> 300 / 3
    assert average_lagging([100, 400, 700], 900) == pytest.approx(100.0)


def test_al_with_reference_length():
    # reference length 2 -> 500 ms per token: 200, 400 - 500, 1000 - 1000 -> 100 / 3
    assert average_lagging([200, 400, 1000, 1000], 1000, target_length=2) == pytest.approx(100 / 3)


def test_al_first_delay_beyond_source_is_returned():
    assert average_lagging([1200, 1300], 1000) == 1200.0


def test_offsets():
    assert start_offset([320, 640, 1500]) == 320.0
    assert end_offset([320, 640, 1500], 1400) == 100.0
    assert end_offset([320, 640], 1400) == -760.0


def test_computation_aware_adds_elapsed_compute():
    assert computation_aware([320, 640], [50, 130]) == [370.0, 770.0]
    with pytest.raises(ValueError, match="one compute time per delay"):
        computation_aware([320, 640], [50])


SEGMENTS = [(320, 200), (640, 500), (1600, 100)]  # (delay, duration)


def test_speech_timeline_and_discontinuities():
    # 320..520; waits for the source until 640 (gap 120); 640..1140; waits until 1600 (gap 460)
    assert speech_intervals(SEGMENTS) == [(320, 200), (640, 500), (1600, 100)]
    assert speech_discontinuities(SEGMENTS) == [120, 460]
    # overlapping output queues up instead: the second starts when the first ends
    assert speech_intervals([(320, 1000), (640, 100)]) == [(320, 1000), (1320, 100)]
    assert speech_discontinuities([(320, 1000), (640, 100)]) == []


def test_speech_end_offset_and_ratio_use_the_timeline():
    assert speech_end_offset(SEGMENTS, 2000) == pytest.approx(1700 - 2000)
    assert speech_timeline_ratio(SEGMENTS, 2000) == pytest.approx(0.85)
    assert speech_end_offset([(320, 1000), (640, 100)], 1000) == pytest.approx(420)


def test_speech_latency_report():
    r = speech_latency(SEGMENTS, 2000, compute_ms=[50, 100, 400])
    # AL on segment delays, |Y| = 3 segments: 320 + (640 - 666.67) + (1600 - 1333.33) = 560 / 3
    assert r["AL"] == pytest.approx(560 / 3)
    assert r["StartOffset"] == 320 and r["EndOffset"] == pytest.approx(-300)
    assert r["RTF"] == pytest.approx(0.85)
    assert (r["DiscontinuitySum"], r["DiscontinuityAve"], r["DiscontinuityNum"]) == (580, 290, 2)
    assert r["segments"] == 3 and r["duration_ms"] == 800
    # CA delays 370, 740, 2000 -> AL: 370 + (740 - 666.67) + (2000 - 1333.33) = 1110 / 3
    assert r["AL_CA"] == pytest.approx(1110 / 3)
    assert r["StartOffset_CA"] == 370
    # CA timeline 370..570, 740..1240, 2000..2100
    assert r["EndOffset_CA"] == pytest.approx(100) and r["RTF_CA"] == pytest.approx(1.05)


def test_text_latency_report():
    r = text_latency([200, 400, 1000, 1000], 1000, compute_ms=[10, 20, 30, 40])
    assert r["count"] == 4 and r["AL"] == pytest.approx(850 / 3)
    assert r["StartOffset"] == 200 and r["EndOffset"] == 0
    # CA: 210, 420, 1030 (>= |X|, tau = 3): 210 + 170 + 530 = 910 / 3
    assert r["AL_CA"] == pytest.approx(910 / 3) and r["EndOffset_CA"] == 40


def test_nothing_emitted_gives_none():
    r = text_latency([], 1000)
    assert r == {"count": 0, "AL": None, "StartOffset": None, "EndOffset": None}
    s = speech_latency([], 1000, compute_ms=[])
    assert s["AL"] is None and s["AL_CA"] is None and s["segments"] == 0 and s["DiscontinuityNum"] == 0


def test_aligned_delays_start_at_the_first_segment():
    assert speech_aligned_delays(SEGMENTS, [0, 150, 900]) == [320, 470, 1220]


@pytest.mark.parametrize("call, match", [
    (lambda: average_lagging([], 1000), "empty"),
    (lambda: average_lagging([100], 0), "source length must be > 0"),
    (lambda: average_lagging([float("nan")], 1000), "finite"),
    (lambda: speech_intervals([]), "at least one segment"),
    (lambda: speech_intervals([(100, -5)]), "duration >= 0"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
