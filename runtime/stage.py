"""The one interface every backend implements (polygraphy-style: one runner per backend).

A ``Stage`` runs one exported stage graph. It is stateless: the caller (a ``Stream``) owns the
state object and passes it in; the stage returns the data outputs as host numpy arrays and the next
state. What a state *is* belongs to the backend: a dict of numpy arrays on CPU, device buffers on
TensorRT / ORT-CUDA (swapped by pointer, never copied to the host).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np

from echostream.contract import StageContract

StageState = Any  # backend-specific; a dict[str, np.ndarray] for host backends


class Stage(ABC):
    """One stage graph on one backend."""

    contract: StageContract

    @property
    def name(self) -> str:
        return self.contract.stage

    @abstractmethod
    def initial_state(self, batch: int = 1) -> StageState:
        """Zero caches and zero counters for ``batch`` streams."""

    @abstractmethod
    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        state: StageState | None = None,
        context: StageState | None = None,
    ) -> tuple[dict[str, np.ndarray], StageState | None]:
        """Run one step.

        Args:
            inputs: the contract's data inputs (host arrays).
            state: this stage's state (None for stateless stages).
            context: another stage's state read by this one (``mt_decoder`` reads ``mt_source``'s).
        Returns:
            (data outputs as host arrays keyed by contract name, next state).
        """

    def copy_state(self, state: StageState) -> StageState:
        """A copy that later ``run`` calls cannot change (for speculative decoding that may be
        rolled back; the MT policy takes one per generated token).

        Host backends never write into their input arrays and return fresh outputs, so a host state
        is immutable and a shallow copy is enough; backends that reuse device buffers (TensorRT,
        ORT-CUDA) override this with a real copy.
        """
        return dict(state)

    def stack_states(self, states: list[StageState]) -> StageState:
        """One state for the streams of ``states`` batched in this order (axis 0).

        Host states: numpy concatenation, without a copy when the states are the consecutive
        rows of one array (the previous call's batched result); device backends override this.
        """
        from echostream.runtime.scheduler import stack_rows

        return {name: stack_rows([s[name] for s in states]) for name in states[0]}

    def split_state(self, state: StageState, sizes: list[int]) -> list[StageState]:
        """The inverse of :meth:`stack_states`: per-stream states of ``sizes`` rows each (host
        states: views, no copy; host states are never written in place)."""
        offsets = np.cumsum([0] + list(sizes))
        return [{k: v[offsets[i]:offsets[i + 1]] for k, v in state.items()}
                for i in range(len(sizes))]

    def state_to_host(self, state: StageState) -> dict[str, np.ndarray]:
        """State as host numpy arrays keyed by state name (for parity checks and debugging)."""
        return {k: np.asarray(v) for k, v in state.items()}

    def state_from_host(self, arrays: Mapping[str, np.ndarray]) -> StageState:
        """The backend's state holding ``arrays`` (keyed by state name); host backends keep them."""
        self.check_host_state(arrays)
        return {name: arrays[name] for name in self.contract.state_names}

    def check_host_state(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Check host state arrays against the contract (names, dtypes, shapes); their batch."""
        return check_host_feed(dataclasses.replace(self.contract, data_inputs=(), context=()),
                               {}, arrays)


def grow_fifo_state(arrays: Mapping[str, np.ndarray], contract: StageContract
                    ) -> dict[str, np.ndarray]:
    """A state of shorter right-aligned FIFOs as the state of ``contract``'s longer ones: each
    array zero-padded at the start of every axis where it is shorter (the oldest slots, which the
    counters mark empty); counters and equal-shaped arrays are kept as they are."""
    out = {}
    for spec in contract.states:
        a = arrays[spec.name]
        want = spec.concrete_shape(a.shape[0])
        if tuple(a.shape) == want:
            out[spec.name] = a
            continue
        if len(want) != a.ndim or any(w < n for w, n in zip(want, a.shape)):
            raise ValueError(f"{contract.stage}: cannot grow {spec.name} of shape {list(a.shape)} "
                             f"to {list(want)}")
        grown = np.zeros(want, a.dtype)
        grown[tuple(slice(w - n, None) for w, n in zip(want, a.shape))] = a
        out[spec.name] = grown
    return out


def zero_host_state(contract: StageContract, batch: int) -> dict[str, np.ndarray]:
    """Host zero state built from the contract (shared by the host backends)."""
    return {s.name: np.zeros(s.concrete_shape(batch), dtype=s.dtype) for s in contract.states}


def check_host_feed(
    contract: StageContract,
    inputs: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray] | None = None,
    context: Mapping[str, np.ndarray] | None = None,
) -> int:
    """Check a host feed against the contract before it reaches a backend; returns the batch size.

    Every group (data inputs, context, state) must carry exactly the contract's names; every array
    must have the contract's dtype and shape with one batch size shared by all of them.

    Raises:
        ValueError naming the stage and tensor, expected vs got.
    """
    groups = (("inputs", contract.data_inputs, inputs), ("context", contract.context, context),
              ("state", contract.states, state))
    batch = None
    for group, specs, given in groups:
        given = given or {}
        want = [s.name for s in specs]
        if sorted(given) != sorted(want):
            raise ValueError(f"{contract.stage}: {group} names expected {want}, got {sorted(given)}")
        for spec in specs:
            arr = given[spec.name]
            if not isinstance(arr, np.ndarray):
                raise ValueError(
                    f"{contract.stage}: {spec.name} must be a numpy array, got {type(arr).__name__}"
                )
            if arr.dtype != np.dtype(spec.dtype):
                raise ValueError(
                    f"{contract.stage}: {spec.name} dtype expected {spec.dtype}, got {arr.dtype}"
                )
            if batch is None and arr.ndim > 0:
                batch = int(arr.shape[0])
            expected = spec.concrete_shape(batch if batch is not None else 1)
            if tuple(arr.shape) != expected:
                raise ValueError(
                    f"{contract.stage}: {spec.name} shape expected {list(expected)} (B={batch}), "
                    f"got {list(arr.shape)}"
                )
    if batch is None or batch < 1:
        raise ValueError(f"{contract.stage}: batch size expected >= 1, got {batch}")
    return batch
