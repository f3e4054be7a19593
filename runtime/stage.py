"""The one interface every backend implements (polygraphy-style: one runner per backend).

A ``Stage`` runs one exported stage graph. It is stateless: the caller (a ``Stream``) owns the
state object and passes it in; the stage returns the data outputs as host numpy arrays and the next
state. What a state *is* belongs to the backend: a dict of numpy arrays on CPU, device buffers on
TensorRT / ORT-CUDA (swapped by pointer, never copied to the host).
"""
from __future__ import annotations

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
        """An independent copy (for speculative decoding that may be rolled back)."""
        return {k: np.array(v, copy=True) for k, v in state.items()}

    def state_to_host(self, state: StageState) -> dict[str, np.ndarray]:
        """State as host numpy arrays keyed by state name (for parity checks and debugging)."""
        return {k: np.asarray(v) for k, v in state.items()}


def zero_host_state(contract: StageContract, batch: int) -> dict[str, np.ndarray]:
    """Host zero state built from the contract (shared by the host backends)."""
    return {s.name: np.zeros(s.concrete_shape(batch), dtype=s.dtype) for s in contract.states}
