"""Three algorithms on the same audio, per segment position (issue 11): what one policy segment
costs as the sentence grows.

- ``streamspeech``: StreamSpeech's agent itself (the PyTorch reference of its algorithm,
  ``models/streamspeech_agent.py``): every call re-encodes all audio, re-decodes the committed
  text against all of it, re-runs T2U and the unit decoder over the sentence and vocodes every
  unit; PyTorch eager, as the agent runs.
- ``exact``: EchoStream's ``--fidelity exact`` on ONNX Runtime: the same decisions and ids; the
  encoder keeps completed chunks, the decoders re-run over the sentence (the cost grows with the
  sentence, not with the stream).
- ``incremental``: EchoStream's default on ONNX Runtime: every stage on new input only.

Each is a ``Translator`` fed the speech one segment at a time (``decode`` after every segment);
the wall time of each ``decode`` is that segment's cost. The agent's curve stops once its
cumulative time passes a budget (its cost per call grows with the prefix).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def segment_costs(translator, audio: np.ndarray, budget_s: float | None = None) -> dict[str, Any]:
    """Feed ``audio`` (16 kHz) one policy segment at a time; the wall time of every ``decode``.

    Returns:
        ``{"positions_s": [...], "ms": [...], "stopped_at_s": float | None}``.
    """
    seg = translator.segment_ms * 16
    stream = translator.create_stream()
    positions, costs, spent = [], [], 0.0
    stopped = None
    for start in range(0, len(audio), seg):
        stream.accept_waveform(16000, audio[start:start + seg])
        t0 = time.perf_counter()
        translator.decode(stream)
        dt = time.perf_counter() - t0
        spent += dt
        positions.append(min(start + seg, len(audio)) / 16000.0)
        costs.append(1000.0 * dt)
        if budget_s is not None and spent > budget_s and start + seg < len(audio):
            stopped = positions[-1]
            break
    if stopped is None:
        stream.input_finished()
        t0 = time.perf_counter()
        translator.decode(stream)
        positions.append(len(audio) / 16000.0)
        costs.append(1000.0 * (time.perf_counter() - t0))
    return {"positions_s": positions, "ms": costs, "stopped_at_s": stopped}


def compare_algorithms(make: Callable[[str, str], Any], audio: np.ndarray, budget_s: float,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """``make(backend, fidelity)`` -> Translator; the three curves on ``audio``."""
    runs = {"incremental": ("onnxruntime", "incremental", None),
            "exact": ("onnxruntime", "exact", None),
            "streamspeech": ("torch", "exact", budget_s)}
    out = {}
    for name, (backend, fidelity, budget) in runs.items():
        log(f"algorithms: {name} ({backend}, {fidelity}) on {len(audio) / 16000:.1f} s")
        translator = make(backend, fidelity)
        segment_costs(translator, audio[:16000])  # warm-up: first calls allocate
        out[name] = segment_costs(translator, audio, budget)
    return out


def at_position(curve: dict[str, Any], seconds: float) -> float | None:
    """ms per segment at the first position >= ``seconds`` (None past the measured range)."""
    for position, ms in zip(curve["positions_s"], curve["ms"]):
        if position >= seconds - 1e-9:
            return ms
    return None
