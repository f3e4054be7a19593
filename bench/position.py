"""Per-segment encoder cost against stream position: EchoStream's Emformer step vs StreamSpeech.

EchoStream: the encoder stage is one fixed-shape graph (state = fixed-capacity caches + a counter),
so a step at minute 10 should cost what a step at second 5 costs. We reach each position with the
*real* chained steps (every step's ``next_state`` fed to the next; at 320 ms per step even 10 min is
only 1875 steps, seconds of compute on ONNX Runtime), then time repeated steps from the state at
that position on every backend.
Random states with the counter set would give the same cost (same shapes, no data-dependent
control flow), but the real chain is affordable and leaves nothing to argue about.

StreamSpeech: its agent has no encoder state and re-encodes the whole received prefix at every
segment (``ChunkConformerEncoder.encode_prefix``), so one call at position ``p`` *is* the cost of
the segment that ends at ``p``. Attention over the prefix is quadratic in time and memory, so
positions are measured in increasing order until the time budget or the memory cap says stop; the
positions not measured are reported as such (never extrapolated).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .timing import Timing, time_budgeted, time_calls

ENCODER_FRAME_S = 0.04  # one subsampled frame = 40 ms
FBANK_FRAME_S = 0.01


@dataclass
class PositionCurve:
    """Per-segment cost at each measured stream position (seconds of audio)."""

    name: str
    positions_s: list[float] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # chained steps behind each point (Emformer)
    paired: list[Timing] = field(default_factory=list)  # a reference timed beside each point
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"position_s", "reason"}
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "notes": self.notes, "skipped": self.skipped,
                "points": [{"position_s": p, **t.to_dict(),
                            **({"steps": self.steps[i]} if self.steps else {}),
                            **({"paired": self.paired[i].to_dict()} if self.paired else {})}
                           for i, (p, t) in enumerate(zip(self.positions_s, self.timings))]}


def segment_seconds(cfg: dict[str, Any]) -> float:
    """Audio per encoder step: S frames x 40 ms."""
    return cfg["encoder"]["segment_length"] * ENCODER_FRAME_S


def emformer_curves(stages: dict[str, Any], cfg: dict[str, Any], positions_s: list[float],
                    repeats: int, warmup: int, chain: str | None = None,
                    seed: int = 0) -> dict[str, PositionCurve]:
    """Chain real encoder steps, then time a step on every backend at each position.

    The chain runs on one backend (``chain``, default the first) and keeps the host-numpy state
    at every position; every backend is then timed from those states (all backends share the
    state contract, and the parity suite holds them to the same numbers), so a slow backend does
    not have to walk 10 minutes itself. Timing is *interleaved*: each round times one step at
    every position, so a change in machine load over the run hits all positions alike instead of
    masquerading as a cost that depends on position.

    Args:
        stages: backend name -> encoder ``Stage`` (``x`` ``[1, 4(S+R)+3, 80]`` -> ``y`` ``[1, S, D]``).
        positions_s: stream positions (seconds); each is rounded to whole segments.
    Returns:
        backend name -> curve; position ``p`` is the state after ``round(p / segment)`` steps.
    """
    seg_s = segment_seconds(cfg)
    chain_name = chain or next(iter(stages))
    chain_stage = stages[chain_name]
    spec = chain_stage.contract.data_inputs[0]
    rng = np.random.default_rng(seed)
    # A small pool of fbank windows, cycled: the content does not change the cost.
    pool = [rng.standard_normal(spec.concrete_shape(1), dtype=np.float32) for _ in range(8)]
    positions = sorted(positions_s)
    states, steps = [], []  # host state (and step count) at each position
    state, done = chain_stage.initial_state(1), 0
    for position in positions:
        while done < max(1, round(position / seg_s)):
            _, state = chain_stage.run({"x": pool[done % len(pool)]}, state)
            done += 1
        states.append(chain_stage.state_to_host(state))
        steps.append(done)
    x = pool[0]
    notes = (f"real chained steps of {seg_s * 1000:.0f} ms (on {chain_name}); {repeats} timed "
             "steps per position, interleaved across positions")
    curves = {}
    for name, stage in stages.items():
        for host_state in states:  # warm-up at every position
            for _ in range(warmup):
                stage.run({"x": x}, host_state)
        seconds: list[list[float]] = [[] for _ in positions]
        for _ in range(repeats):
            for i, host_state in enumerate(states):
                start = time.perf_counter()
                stage.run({"x": x}, host_state)
                seconds[i].append(time.perf_counter() - start)
        curves[name] = PositionCurve(name, list(positions), [Timing.of(s) for s in seconds],
                                     list(steps), notes=notes)
    return curves


def conformer_prefix_bytes(cfg: dict[str, Any], position_s: float) -> int:
    """Peak bytes of the attention intermediates of one prefix encode (an estimate, used as a
    guard): relative-position scores ``[H, T, 2T-1]``, the padded and the shifted copies
    ``rel_shift`` makes, then content scores, their sum and the probabilities ``[H, T, T]``; fp32."""
    T = int(position_s / ENCODER_FRAME_S)
    H = cfg["encoder"]["num_heads"]
    return 4 * H * T * (3 * 2 * T + 3 * T)


def conformer_curve(encoder, cfg: dict[str, Any], positions_s: list[float], repeats: int,
                    warmup: int, budget_s: float, memory_cap_bytes: int,
                    paired: Callable[[], Any] | None = None, seed: int = 0) -> PositionCurve:
    """Time ``encoder.encode_prefix`` (StreamSpeech's per-segment cost) at each position.

    ``paired`` (e.g. one EchoStream step) is timed right after every baseline measurement, so the
    speedup at each position compares two costs taken under the same machine load.

    Args:
        encoder: a ``ChunkConformerEncoder`` in eval mode.
        budget_s: total seconds this curve may spend; positions are measured in increasing order
            and the first one whose projected cost exceeds what is left ends the curve.
        memory_cap_bytes: positions whose attention intermediates would exceed this are skipped.
    """
    import torch

    F = cfg["features"]["num_mel_bins"]
    g = torch.Generator().manual_seed(seed)
    curve = PositionCurve("streamspeech_conformer_prefix",
                          notes="ChunkConformerEncoder.encode_prefix over the whole prefix (the "
                                "agent re-encodes it every segment), PyTorch eager")
    start, last = time.perf_counter(), None  # last = (position, median seconds)
    for position in sorted(positions_s):
        need = conformer_prefix_bytes(cfg, position)
        if need > memory_cap_bytes:
            curve.skipped.append({"position_s": position, "reason": (
                f"attention intermediates ~{need / 2**30:.1f} GiB exceed the memory cap "
                f"{memory_cap_bytes / 2**30:.1f} GiB")})
            continue
        left = budget_s - (time.perf_counter() - start)
        if last is not None:
            # Attention makes a long prefix quadratic: project quadratically from the last point
            # (an overestimate at short positions, where the linear layers still dominate).
            projected = last[1] * (position / last[0]) ** 2
            if projected * (1 + warmup) > left:
                curve.skipped.append({"position_s": position, "reason": (
                    f"one call projected >= {projected:.1f} s; {max(left, 0):.0f} s of the "
                    f"{budget_s:.0f} s baseline budget left")})
                continue
        features = torch.randn(1, int(round(position / FBANK_FRAME_S)), F, generator=g)
        with torch.inference_mode():
            timing = time_budgeted(lambda: encoder.encode_prefix(features), repeats,
                                   warmup, budget_s=max(left, 1e-3))
        curve.positions_s.append(position)
        curve.timings.append(timing)
        if paired is not None:
            curve.paired.append(time_calls(paired, repeats=5, warmup=1))
        last = (position, timing.median_s)
    return curve
