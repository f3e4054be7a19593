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
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

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


class StreamingSynthesizer:
    """Units in, waveform out, one utterance at a time.

    Args:
        duration_stage: a ``runtime.stage.Stage`` for ``duration`` (``run({"x": [1, Wd] int32})
            -> ({"y": [1, Wd] float32}, None)``).
        vocoder_stage: a ``Stage`` for ``vocoder`` (``run({"x": [1, Wv] int32}) ->
            ({"y": [1, Wv * hop] float32}, None)``).
        cfg: the model config dict (``EchoStreamConfig.to_dict()`` / manifest ``config``).
    """

    def __init__(self, duration_stage: Any, vocoder_stage: Any, cfg: Mapping[str, Any]):
        v = cfg["vocoder"]
        self._duration_stage = duration_stage
        self._vocoder_stage = vocoder_stage
        self.num_codes = int(v["num_units"])
        self.hop = int(np.prod(v["upsample_rates"]))
        self.sample_rate = int(cfg["features"]["sample_rate"])
        self.dur_width = int(v["duration_window"])
        self.dur_context = 2 * ((int(v["duration_kernel"]) - 1) // 2)
        self.left = int(v["window_left"])
        self.chunk = int(v["window_chunk"])
        self.right = int(v["window_right"])
        self.voc_width = self.left + self.chunk + self.right
        if self.dur_width <= 2 * self.dur_context:
            raise ValueError(f"duration_window must exceed 2 x duration context "
                             f"({2 * self.dur_context}), got {self.dur_width}")
        if self.chunk < 1 or self.left < 0 or self.right < 0:
            raise ValueError(f"vocoder windows expected left >= 0, chunk >= 1, right >= 0; got "
                             f"{self.left}, {self.chunk}, {self.right}")
        _check_stage_width(duration_stage, "duration", self.dur_width)
        _check_stage_width(vocoder_stage, "vocoder", self.voc_width)
        self.reset()

    # ---- public API ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything: buffers and counters (a new stream)."""
        self._start_utterance()
        self.num_units = 0  # units pushed
        self.num_frames = 0  # unit frames after duration expansion
        self.num_samples = 0  # samples returned

    def push(self, units: Sequence[int] | np.ndarray) -> np.ndarray:
        """Add new units; returns the float32 samples that became final (a multiple of
        ``chunk * hop``, possibly empty)."""
        units = self._check_units(units)
        self.num_units += len(units)
        self._units = np.concatenate([self._units, units])
        self._add_frames(self._finalize_durations(final=False))
        return self._emit(self._synthesize(final=False))

    def flush(self) -> np.ndarray:
        """End of the utterance: every remaining unit and frame is voiced with the utterance end
        as right context. The next :meth:`push` starts a new utterance; counters keep running."""
        self._add_frames(self._finalize_durations(final=True))
        out = self._emit(self._synthesize(final=True))
        self._start_utterance()
        return out

    @property
    def pending_units(self) -> int:
        """Units whose duration is not final yet."""
        return len(self._units)

    @property
    def pending_frames(self) -> int:
        """Frames expanded but not voiced yet."""
        return len(self._frames)

    # ---- internals ----------------------------------------------------------------------------

    def _start_utterance(self) -> None:
        empty = np.zeros(0, dtype=np.int32)
        self._unit_context = empty  # last <= dur_context units with final durations
        self._units = empty  # units waiting for right context
        self._frame_context = empty  # last <= window_left voiced frames
        self._frames = empty  # frames waiting to be voiced

    def _check_units(self, units: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(units)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"units expected a 1-D sequence of ints, got dtype {arr.dtype} "
                             f"shape {list(arr.shape)}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_codes):
            raise ValueError(f"unit codes expected in 0..{self.num_codes - 1}, got "
                             f"{arr.min()}..{arr.max()}")
        return arr.astype(np.int32)

    def _finalize_durations(self, final: bool) -> np.ndarray:
        """Predict durations for every unit that has its right context -> expanded frames."""
        c, step = self.dur_context, self.dur_width - 2 * self.dur_context
        frames = []
        while True:
            ready = len(self._units) - (0 if final else c)
            if ready <= 0:
                break
            n = min(ready, step)
            # Window: c left-context units, n units to finalize, up to c right-context units.
            x = _window(self._unit_context, self._units[:n + c], c, self.dur_width)
            log_dur = self._run(self._duration_stage, x, self.dur_width)[0, c:c + n]
            frames.append(np.repeat(self._units[:n], durations_from_log(log_dur)))
            self._unit_context = _tail(np.concatenate([self._unit_context, self._units[:n]]), c)
            self._units = self._units[n:]
        return np.concatenate(frames) if frames else np.zeros(0, dtype=np.int32)

    def _add_frames(self, frames: np.ndarray) -> None:
        self.num_frames += len(frames)
        self._frames = np.concatenate([self._frames, frames.astype(np.int32)])

    def _synthesize(self, final: bool) -> list[np.ndarray]:
        """Voice every chunk whose look-ahead is complete (all remaining frames when ``final``)."""
        out = []
        while len(self._frames) >= (1 if final else self.chunk + self.right):
            n = min(self.chunk, len(self._frames))
            body = self._frames[:n + self.right]
            x = _window(self._frame_context, body, self.left, self.voc_width)
            wav = self._run(self._vocoder_stage, x, self.voc_width * self.hop)
            out.append(wav[0, self.left * self.hop:(self.left + n) * self.hop])
            self._frame_context = _tail(
                np.concatenate([self._frame_context, self._frames[:n]]), self.left)
            self._frames = self._frames[n:]
        return out

    def _emit(self, pieces: list[np.ndarray]) -> np.ndarray:
        out = (np.concatenate(pieces) if pieces else np.zeros(0)).astype(np.float32, copy=False)
        self.num_samples += len(out)
        return out

    @staticmethod
    def _run(stage: Any, x: np.ndarray, out_width: int) -> np.ndarray:
        outputs, _ = stage.run({"x": x})
        y = np.asarray(outputs["y"])
        if y.shape != (1, out_width):
            raise ValueError(f"stage output y expected shape [1, {out_width}], got {list(y.shape)}")
        return y
