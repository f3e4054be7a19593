"""Streaming speech synthesis from incrementally arriving units (numpy only, no torch).

Units (deduplicated codes 0..num_units-1) arrive a few at a time from the unit decoder. Two
stateless stage graphs turn them into audio:

- ``duration`` ([1, Wd] int32 units, -1 = none -> [1, Wd] log-durations): a unit's duration needs
  ``c`` units of context on each side (two kernel-k convs: c = 2 * (k - 1) // 2). It is final once
  ``c`` later units have arrived, or at :meth:`StreamingSynthesizer.flush`.
- ``vocoder`` ([1, L + C + R] int32 expanded frames, -1 = none -> [1, (L + C + R) * hop] samples):
  each call re-reads ``L`` already-voiced frames, voices a chunk of ``C`` frames and looks ``R``
  frames ahead; only the chunk's ``C * hop`` samples are emitted.

-1 marks positions outside the utterance, which the graphs treat exactly as whole-utterance
synthesis treats its zero padding. With ``L`` and ``R`` at least the generator's receptive field
(the config default), the streamed samples equal whole-utterance synthesis up to float rounding,
and how the units were split across :meth:`push` calls does not change them.

Per stage call the work is one fixed window; between calls only the context still needed is kept
(``c`` units, ``L`` frames, and fewer than ``c`` units / ``C + R`` frames not yet final).

The buffers are data (:class:`SynthesisState`, one per stream); :func:`push` and :func:`flush` are
programs (``runtime/scheduler.py``) that say which stage to run on which window and take the
outputs, so a translator can batch many streams' synthesis calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from echostream.contract import Config, as_config, duration_context, vocoder_hop
from echostream.runtime.scheduler import Program, StageCall, drive

NO_ID = -1  # "outside the utterance" in the stage windows


def durations_from_log(log_dur: np.ndarray) -> np.ndarray:
    """fairseq's rounding: ``max(1, round(exp(log_dur) - 1))`` (round half to even), int64.

    Computed in float32 like the PyTorch reference."""
    log_dur = np.asarray(log_dur, dtype=np.float32)
    if not np.all(np.isfinite(log_dur)):
        raise ValueError("duration stage returned non-finite log-durations")
    return np.maximum(np.round(np.exp(log_dur) - np.float32(1.0)), 1).astype(np.int64)


def _tail(values: np.ndarray, n: int) -> np.ndarray:
    """The last ``n`` entries, or all if fewer (``values[-n:]`` would be wrong for n == 0)."""
    return values[max(len(values) - n, 0):]


def _window(left: np.ndarray, body: np.ndarray, left_width: int, width: int) -> np.ndarray:
    """[1, width] int32: ``left`` right-aligned in the first ``left_width`` slots, then ``body``;
    every other slot is -1 (outside the utterance)."""
    x = np.full((1, width), NO_ID, dtype=np.int32)
    x[0, left_width - len(left):left_width] = left
    x[0, left_width:left_width + len(body)] = body
    return x


def _check_stage_width(stage: Any, name: str, width: int) -> None:
    """A stage that carries a contract (runtime ``Stage``) must take the window the config says."""
    contract = getattr(stage, "contract", None)
    if contract is None:
        return
    got = tuple(contract.spec("x").shape)
    if contract.stage != name or got[1:] != (width,):
        raise ValueError(f"{name} stage expected input x [B, {width}], got stage "
                         f"{contract.stage!r} with x {list(got)}")


@dataclass(frozen=True)
class SynthesisWindows:
    """The synthesiser's fixed sizes, from the model config (``vocoder`` section)."""

    num_codes: int
    hop: int
    sample_rate: int
    dur_width: int
    dur_context: int
    left: int
    chunk: int
    right: int

    @classmethod
    def from_config(cls, cfg: Config) -> "SynthesisWindows":
        c = as_config(cfg)
        v = c.vocoder
        out = cls(v.num_units, vocoder_hop(c), c.features.sample_rate, v.duration_window,
                  duration_context(v.duration_kernel), v.window_left, v.window_chunk,
                  v.window_right)
        if out.dur_width <= 2 * out.dur_context:
            raise ValueError(f"duration_window must exceed 2 x duration context "
                             f"({2 * out.dur_context}), got {out.dur_width}")
        if out.chunk < 1 or out.left < 0 or out.right < 0:
            raise ValueError(f"vocoder windows expected left >= 0, chunk >= 1, right >= 0; got "
                             f"{out.left}, {out.chunk}, {out.right}")
        return out

    @property
    def voc_width(self) -> int:
        return self.left + self.chunk + self.right


_EMPTY = np.zeros(0, dtype=np.int32)


@dataclass
class SynthesisState:
    """One stream's synthesiser buffers and counters (data; :func:`push` and :func:`flush` are
    the programs that run the stages on it)."""

    unit_context: np.ndarray = field(default_factory=lambda: _EMPTY)  # <= c units, durations final
    units: np.ndarray = field(default_factory=lambda: _EMPTY)  # units waiting for right context
    frame_context: np.ndarray = field(default_factory=lambda: _EMPTY)  # <= window_left voiced frames
    frames: np.ndarray = field(default_factory=lambda: _EMPTY)  # frames waiting to be voiced
    num_units: int = 0  # units pushed
    num_frames: int = 0  # unit frames after duration expansion
    num_samples: int = 0  # samples returned

    def start_utterance(self) -> None:
        self.unit_context = self.units = self.frame_context = self.frames = _EMPTY

    @property
    def pending_units(self) -> int:
        """Units whose duration is not final yet."""
        return len(self.units)

    @property
    def pending_frames(self) -> int:
        """Frames expanded but not voiced yet."""
        return len(self.frames)


def check_units(units: Sequence[int] | np.ndarray, num_codes: int) -> np.ndarray:
    arr = np.asarray(units)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"units expected a 1-D sequence of ints, got dtype {arr.dtype} "
                         f"shape {list(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_codes):
        raise ValueError(f"unit codes expected in 0..{num_codes - 1}, got "
                         f"{arr.min()}..{arr.max()}")
    return arr.astype(np.int32)


def push(state: SynthesisState, w: SynthesisWindows, units: Sequence[int] | np.ndarray) -> Program:
    """Program: add new units; returns the float32 samples that became final (a multiple of
    ``chunk * hop``, possibly empty)."""
    units = check_units(units, w.num_codes)
    state.num_units += len(units)
    state.units = np.concatenate([state.units, units])
    _add_frames(state, (yield from _finalize_durations(state, w, final=False)))
    return _emit(state, (yield from _synthesize(state, w, final=False)))


def flush(state: SynthesisState, w: SynthesisWindows) -> Program:
    """Program: end of the utterance: every remaining unit and frame is voiced with the utterance
    end as right context. The next :func:`push` starts a new utterance; counters keep running."""
    _add_frames(state, (yield from _finalize_durations(state, w, final=True)))
    out = _emit(state, (yield from _synthesize(state, w, final=True)))
    state.start_utterance()
    return out


def _finalize_durations(state: SynthesisState, w: SynthesisWindows, final: bool) -> Program:
    """Predict durations for every unit that has its right context -> expanded frames."""
    units, durations = yield from _predict_durations(state, w, final)
    return np.repeat(units, durations) if len(units) else _EMPTY


def _predict_durations(state: SynthesisState, w: SynthesisWindows, final: bool) -> Program:
    """Durations of every unit that has its right context -> (those units, their durations)."""
    c, step = w.dur_context, w.dur_width - 2 * w.dur_context
    done, durations = [], []
    while True:
        ready = len(state.units) - (0 if final else c)
        if ready <= 0:
            break
        n = min(ready, step)
        # Window: c left-context units, n units to finalize, up to c right-context units.
        x = _window(state.unit_context, state.units[:n + c], c, w.dur_width)
        log_dur = (yield from _run("duration", x, w.dur_width))[0, c:c + n]
        done.append(state.units[:n])
        durations.append(durations_from_log(log_dur))
        state.unit_context = _tail(np.concatenate([state.unit_context, state.units[:n]]), c)
        state.units = state.units[n:]
    if not done:
        return _EMPTY, np.zeros(0, np.int64)
    return np.concatenate(done), np.concatenate(durations)


def tail(w: SynthesisWindows, units: Sequence[int] | np.ndarray, new: int) -> Program:
    """Program: the samples that whole-utterance synthesis of ``units`` gives its last ``new``
    units (StreamSpeech's agent vocodes the whole unit sequence at every write and emits that
    tail), computed from windows: durations of the new units and of the ``window_left`` units
    before them (their frames are the vocoder's left context), each with its duration context,
    the sequence end as right context. Returns float32 samples."""
    units = check_units(units, w.num_codes)
    first_new = len(units) - new
    start = max(0, first_new - w.left)  # every unit is >= 1 frame: enough left context frames
    state = SynthesisState(unit_context=units[max(0, start - w.dur_context):start],
                           units=units[start:])
    done, durations = yield from _predict_durations(state, w, final=True)
    frames = np.repeat(done, durations).astype(np.int32)
    context = int(durations[:first_new - start].sum())
    state.frame_context = _tail(frames[:context], w.left)
    state.frames = frames[context:]
    return _emit(state, (yield from _synthesize(state, w, final=True)))


def _add_frames(state: SynthesisState, frames: np.ndarray) -> None:
    state.num_frames += len(frames)
    state.frames = np.concatenate([state.frames, frames.astype(np.int32)])


def _synthesize(state: SynthesisState, w: SynthesisWindows, final: bool) -> Program:
    """Voice every chunk whose look-ahead is complete (all remaining frames when ``final``)."""
    out = []
    while len(state.frames) >= (1 if final else w.chunk + w.right):
        n = min(w.chunk, len(state.frames))
        body = state.frames[:n + w.right]
        x = _window(state.frame_context, body, w.left, w.voc_width)
        wav = yield from _run("vocoder", x, w.voc_width * w.hop)
        out.append(wav[0, w.left * w.hop:(w.left + n) * w.hop])
        state.frame_context = _tail(np.concatenate([state.frame_context, state.frames[:n]]), w.left)
        state.frames = state.frames[n:]
    return out


def _emit(state: SynthesisState, pieces: list[np.ndarray]) -> np.ndarray:
    out = (np.concatenate(pieces) if pieces else np.zeros(0)).astype(np.float32, copy=False)
    state.num_samples += len(out)
    return out


def _run(stage: str, x: np.ndarray, out_width: int) -> Program:
    outputs, _ = yield StageCall(stage, {"x": x})
    y = np.asarray(outputs["y"])
    if y.shape != (1, out_width):
        raise ValueError(f"{stage} stage output y expected shape [1, {out_width}], "
                         f"got {list(y.shape)}")
    return y


class StreamingSynthesizer:
    """One synthesiser driving its own two stages (standalone use, outside a ``Translator``:
    tests and tools; the translator runs :func:`push` / :func:`flush` through its scheduler).

    Args:
        duration_stage: a ``Stage`` for ``duration`` (``run({"x": [1, Wd] int32}) ->
            ({"y": [1, Wd] float32}, None)``).
        vocoder_stage: a ``Stage`` for ``vocoder`` (``run({"x": [1, Wv] int32}) ->
            ({"y": [1, Wv * hop] float32}, None)``).
        cfg: the model config dict (``EchoStreamConfig.to_dict()`` / manifest ``config``).
    """

    def __init__(self, duration_stage: Any, vocoder_stage: Any, cfg: Mapping[str, Any]):
        self.windows = SynthesisWindows.from_config(cfg)
        self._duration_stage, self._vocoder_stage = duration_stage, vocoder_stage
        _check_stage_width(duration_stage, "duration", self.windows.dur_width)
        _check_stage_width(vocoder_stage, "vocoder", self.windows.voc_width)
        self._stages = {"duration": duration_stage, "vocoder": vocoder_stage}
        self.sample_rate = self.windows.sample_rate
        self.reset()

    def reset(self) -> None:
        """Forget everything: buffers and counters (a new stream)."""
        self.state = SynthesisState()

    def push(self, units: Sequence[int] | np.ndarray) -> np.ndarray:
        return drive(self._stages, push(self.state, self.windows, units))

    def flush(self) -> np.ndarray:
        return drive(self._stages, flush(self.state, self.windows))

    @property
    def num_units(self) -> int:
        return self.state.num_units

    @property
    def num_frames(self) -> int:
        return self.state.num_frames

    @property
    def num_samples(self) -> int:
        return self.state.num_samples

    @property
    def pending_units(self) -> int:
        return self.state.pending_units

    @property
    def pending_frames(self) -> int:
        return self.state.pending_frames
