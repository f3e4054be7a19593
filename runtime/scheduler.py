"""Running many streams' work through one set of stages, each stage once per round.

A stream's work is written as a *program*: a generator that yields :class:`StageCall` requests
(which stage to run on which inputs and state) and receives each call's result, ``(outputs,
next_state)``, back from ``yield``. The programs contain the decisions and the bookkeeping; only
:func:`run_programs` calls stages. It advances every program in lock step: each round it collects
the request every live program is waiting on, groups the requests by stage, runs each group as
*one* batched call (inputs, contexts and states stacked on axis 0, results split back per
stream) and sends each program its rows. Streams at different positions and in different phases
batch correctly because every stage graph keeps one counter per stream.

Symbols: ``B`` the streams batched in one call, ``b`` one stream's row.

Examples:
    >>> def program(x):
    ...     out, _ = yield StageCall("duration", {"x": x})
    ...     return out["y"]
    >>> run_programs(stages, [program(a), program(b)])   # one duration call with B = 2
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np

from echostream.runtime.stage import Stage, StageState

StageResult = tuple[dict[str, np.ndarray], StageState | None]


@dataclass
class StageCall:
    """One request of a program: run ``stage`` on ``inputs`` (host arrays, batch 1), with this
    stream's ``state`` and ``context``; ``copy=True`` asks for ``Stage.copy_state(state)``
    instead (a snapshot that later calls cannot change; the result is ``({}, copy)``)."""

    stage: str
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    state: StageState | None = None
    context: StageState | None = None
    copy: bool = False


Program = Generator[StageCall, StageResult, Any]
OnCall = Callable[[str, int, float], None]  # (stage, batch, seconds) for each stream's clock


@dataclass
class ProgramFailure:
    """A program that raised: its index and the exception (the other programs carried on)."""

    index: int
    error: BaseException


def run_programs(stages: Mapping[str, Stage], programs: Sequence[Program],
                 clocks: Sequence[OnCall | None] | None = None
                 ) -> tuple[list[Any], list[ProgramFailure]]:
    """Run every program to its end, batching their stage calls round by round.

    Args:
        stages: stage name -> ``Stage``.
        programs: one generator per stream.
        clocks: per program, called with (stage, batch size, seconds) after each call it took
            part in (the whole call's wall time: what the stream waited; batch 0 for a copy).
    Returns:
        (each program's return value, None for one that failed; the programs that raised: each
        stopped where it raised, the others ran to their end).
    """
    clocks = list(clocks) if clocks is not None else [None] * len(programs)
    returns: list[Any] = [None] * len(programs)
    failures: list[ProgramFailure] = []
    pending: dict[int, StageCall] = {}
    step = _Stepper(stages, programs, clocks, returns, failures, pending)
    contexts: dict[str, tuple[list, Any]] = {}  # stage -> (the contexts last stacked, the stack)
    for i in range(len(programs)):
        step(i, None, first=True)
    while pending:
        for stage, members in _groups(pending):
            calls = [pending[i] for i in members]
            start = time.perf_counter()
            results = _run_group(stages[stage], calls, contexts)
            seconds = time.perf_counter() - start
            for i, result in zip(members, results):
                if clocks[i] is not None:
                    clocks[i](stage, len(members), seconds)
                step(i, result)
    return returns, failures


def drive(stages: Mapping[str, Stage], program: Program, clock: OnCall | None = None) -> Any:
    """Run one program alone (outside a Translator: tests, tools); re-raise its error."""
    returns, failures = run_programs(stages, [program], [clock])
    if failures:
        raise failures[0].error
    return returns[0]


class _Stepper:
    """Advances program ``i`` with a result until it waits on a batched call (copies are served
    at once: they do not batch, and a snapshot must precede any later call on the buffers)."""

    def __init__(self, stages, programs, clocks, returns, failures, pending):
        self.stages, self.programs, self.clocks = stages, programs, clocks
        self.returns, self.failures, self.pending = returns, failures, pending

    def __call__(self, i: int, result: StageResult | None, first: bool = False) -> None:
        program = self.programs[i]
        self.pending.pop(i, None)
        try:
            call = next(program) if first else program.send(result)
            while call.copy:
                start = time.perf_counter()
                snapshot = self.stages[call.stage].copy_state(call.state)
                if self.clocks[i] is not None:
                    self.clocks[i](call.stage, 0, time.perf_counter() - start)
                call = program.send(({}, snapshot))
        except StopIteration as stop:
            self.returns[i] = stop.value
            return
        except Exception as exc:  # one stream's failure must not stop the others
            self.failures.append(ProgramFailure(i, exc))
            return
        self.pending[i] = call


def _groups(pending: Mapping[int, StageCall]) -> list[tuple[str, list[int]]]:
    """(stage, program indices waiting on it), in a fixed stage order."""
    groups: dict[str, list[int]] = {}
    for i, call in pending.items():
        groups.setdefault(call.stage, []).append(i)
    return sorted(groups.items())


def _run_group(stage: Stage, calls: list[StageCall],
               contexts: dict[str, tuple[list, Any]]) -> list[StageResult]:
    if len(calls) == 1:
        c = calls[0]
        return [stage.run(c.inputs, c.state, c.context)]
    sizes = [_batch_of(c) for c in calls]
    inputs = {name: stack_rows([c.inputs[name] for c in calls]) for name in calls[0].inputs}
    state = stage.stack_states([c.state for c in calls]) if calls[0].state is not None else None
    context = _stacked_context(stage, calls, contexts) if calls[0].context is not None else None
    outputs, next_state = stage.run(inputs, state, context)
    per_stream_out = _split_arrays(outputs, sizes)
    per_stream_state = stage.split_state(next_state, sizes) if next_state is not None else \
        [None] * len(calls)
    return list(zip(per_stream_out, per_stream_state))


def _stacked_context(stage: Stage, calls: list[StageCall],
                     contexts: dict[str, tuple[list, Any]]) -> Any:
    """The calls' contexts stacked, reusing the last stack when they are the same objects in the
    same order: a context is another stage's state, which stays put while the MT decoder writes
    token after token (its 12 MiB of source K/V per stream would be copied again every round)."""
    parts = [c.context for c in calls]
    last = contexts.get(stage.name)
    if last is not None and len(last[0]) == len(parts) and all(
            a is b for a, b in zip(last[0], parts)):
        return last[1]
    stacked = stage.stack_states(parts)
    contexts[stage.name] = (parts, stacked)
    return stacked


def _batch_of(call: StageCall) -> int:
    for value in call.inputs.values():
        return int(np.asarray(value).shape[0])
    raise ValueError(f"{call.stage}: a call needs at least one data input to batch")


def _split_arrays(arrays: Mapping[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    offsets = np.cumsum([0] + sizes)
    return [{k: v[offsets[i]:offsets[i + 1]] for k, v in arrays.items()} for i in range(len(sizes))]


def stack_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate on axis 0, without a copy when the arrays are consecutive row slices of one
    array (e.g. streams that a previous batched call returned together, in the same order): then
    the result is a view of those rows."""
    first = arrays[0]
    base = first.base
    if (isinstance(base, np.ndarray) and base.ndim == first.ndim and base.flags.c_contiguous
            and all(a.base is base for a in arrays)):
        row = _consecutive_from(arrays, base)
        if row is not None:
            return base[row:row + sum(a.shape[0] for a in arrays)]
    return np.concatenate(arrays, axis=0)


def _consecutive_from(arrays: Sequence[np.ndarray], base: np.ndarray) -> int | None:
    """The row of ``base`` where ``arrays`` start if they are its consecutive rows, else None."""
    row_bytes = base.strides[0]
    start = base.__array_interface__["data"][0]
    position = arrays[0].__array_interface__["data"][0]
    if row_bytes <= 0 or (position - start) % row_bytes:
        return None
    first_row = (position - start) // row_bytes
    for a in arrays:
        if not a.flags.c_contiguous or a.__array_interface__["data"][0] != position:
            return None
        position += a.shape[0] * row_bytes
    return first_row
