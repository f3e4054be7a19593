"""Explicit stage state as dicts of tensors, built and checked against the shared contract."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from echostream.contract import StageContract, TensorSpec

_DTYPES = {"float32": torch.float32, "int32": torch.int32, "float16": torch.float16}


def torch_dtype(spec: TensorSpec) -> torch.dtype:
    return _DTYPES[spec.dtype]


def zero_state(contract: StageContract, batch: int, device: Any = None) -> dict[str, Tensor]:
    """The initial state of a stream: every cache zero, every counter 0."""
    return {
        s.name: torch.zeros(s.concrete_shape(batch), dtype=torch_dtype(s), device=device)
        for s in contract.states
    }


def random_state(contract: StageContract, batch: int, generator: torch.Generator,
                 max_counter: int = 50) -> dict[str, Tensor]:
    """A random but valid state (random caches, random non-negative counters) for parity tests."""
    out = {}
    for s in contract.states:
        shape = s.concrete_shape(batch)
        if s.dtype == "int32":
            out[s.name] = torch.randint(0, max_counter, shape, generator=generator, dtype=torch.int32)
        else:
            out[s.name] = torch.randn(shape, generator=generator)
    return out


def check_tensor(stage: str, spec: TensorSpec, value: Tensor, batch: int | None = None) -> None:
    """Raise ``ValueError`` naming the tensor, expected and got, if ``value`` does not fit ``spec``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{stage}: {spec.name} must be a torch.Tensor, got {type(value).__name__}")
    want = torch_dtype(spec)
    if value.dtype != want:
        raise ValueError(f"{stage}: {spec.name} dtype expected {want}, got {value.dtype}")
    b = value.shape[0] if (batch is None and value.dim() > 0) else batch
    expected = spec.concrete_shape(b if b is not None else 1)
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{stage}: {spec.name} shape expected {list(expected)} (B={b}), got {list(value.shape)}"
        )


def check_state(contract: StageContract, state: dict[str, Tensor], batch: int) -> None:
    """Validate a state dict: same names, shapes and dtypes as the contract (e.g. state from
    another config, or an int64 counter, is refused with expected vs got)."""
    want, got = set(contract.state_names), set(state)
    if want != got:
        raise ValueError(
            f"{contract.stage}: state names expected {sorted(want)}, got {sorted(got)}"
        )
    for spec in contract.states:
        check_tensor(contract.stage, spec, state[spec.name], batch)
