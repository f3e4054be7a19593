"""ONNX Runtime on CUDA with IOBinding: stage states stay on the GPU between steps.

The plain ONNX Runtime backend copies every input to the device and every output back on each
``run()``. Here states are ``OrtValue``s allocated on the device once per stream and bound by
reference: a step binds the current state as inputs and a preallocated spare set as the
``next_*`` outputs, then the two sets swap (ping-pong, like the TensorRT backend). Only data inputs
are uploaded and only data outputs come back to the host.

The session must really run on the CUDAExecutionProvider: ONNX Runtime silently falls back to CPU
when CUDA is missing, so that is checked and refused with :class:`BackendUnavailable`.
``device="cpu"`` runs the same binding logic on the CPU provider (for machines without a GPU).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from echostream.contract import StageContract
from echostream.runtime.onnxruntime_backend import OrtStage
from echostream.runtime.stage import check_host_feed


class OrtDeviceState:
    """One stream's state of one stage as device OrtValues: ``current`` is read, ``spare`` written.

    Shapes: every value is the contract's state shape with ``B = batch``.
    """

    def __init__(self, values: Mapping[str, ort.OrtValue], spare: Mapping[str, ort.OrtValue], batch: int):
        self.current, self.spare, self.batch = dict(values), dict(spare), batch

    def swap(self) -> None:
        self.current, self.spare = self.spare, self.current


class OrtCudaStage(OrtStage):
    """One stage graph on ONNX Runtime's CUDA provider, states bound as device OrtValues.

    Args:
        path: the stage's ``.onnx`` file.
        contract: the stage contract.
        device: ``"cuda"`` (default) or ``"cpu"`` (same IOBinding path on the CPU provider).
        device_id: CUDA device index.
        threads / deterministic: as for :class:`OrtStage`.

    ``run`` consumes its ``state`` (the returned next state is the same object, swapped).
    """

    def __init__(self, path: str | Path, contract: StageContract, *, device: str = "cuda",
                 device_id: int = 0, threads: int | None = None, deterministic: bool = False):
        super().__init__(path, contract, device=device, device_id=device_id, threads=threads,
                         deterministic=deterministic)
        self.device_id = device_id
        self._data_only = dataclasses.replace(contract, context=(), states=())

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        # A copy: on the CPU provider an OrtValue wraps the numpy memory (and OrtValue.numpy() is
        # a view of it), so without one two states could share a buffer that a run writes into.
        owned = np.array(array, copy=True, order="C")
        return ort.OrtValue.ortvalue_from_numpy(owned, self.device, self.device_id)

    def initial_state(self, batch: int = 1) -> OrtDeviceState | None:
        return self.state_from_host(super().initial_state(batch)) if self.contract.states else None

    def state_from_host(self, arrays: Mapping[str, np.ndarray]) -> OrtDeviceState:
        """Upload a host state (zero, random, or one saved with :meth:`state_to_host`)."""
        batch = self.check_host_state(arrays)
        current = {name: self._to_device(arrays[name]) for name in self.contract.state_names}
        spare = {s.name: self._to_device(np.zeros(s.concrete_shape(batch), s.dtype))
                 for s in self.contract.states}
        return OrtDeviceState(current, spare, batch)

    def state_to_host(self, state: OrtDeviceState) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in state.current.items()}

    def copy_state(self, state: OrtDeviceState) -> OrtDeviceState:
        """A snapshot copied on the device (``onnxruntime.copy_tensors``, ORT >= 1.23); where the
        provider has no device-to-device transfer registered (the CPU provider of tests) it goes
        through the host."""
        copy = OrtDeviceState(self._empty(state.batch), self._empty(state.batch), state.batch)
        names = self.contract.state_names
        try:
            ort.copy_tensors([state.current[n] for n in names], [copy.current[n] for n in names],
                             None)
        except (AttributeError, RuntimeError):  # no copy_tensors, or no transfer for this device
            return self.state_from_host(self.state_to_host(state))
        return copy

    def _empty(self, batch: int) -> dict[str, ort.OrtValue]:
        return {s.name: ort.OrtValue.ortvalue_from_shape_and_type(
                    s.concrete_shape(batch), np.dtype(s.dtype), self.device, self.device_id)
                for s in self.contract.states}

    def stack_states(self, states: list[OrtDeviceState]) -> OrtDeviceState:
        """Streams batched on axis 0 (also another stage's state read as context). ORT's Python
        API cannot copy into a slice of a device tensor, so batching goes through the host on
        this backend (TensorRT batches on the device)."""
        hosts = [{n: v.numpy() for n, v in s.current.items()} for s in states]
        return self._device_state({n: np.concatenate([h[n] for h in hosts]) for n in hosts[0]})

    def split_state(self, state: OrtDeviceState, sizes: list[int]) -> list[OrtDeviceState]:
        host = {n: v.numpy() for n, v in state.current.items()}
        offsets = np.cumsum([0] + list(sizes))
        return [self._device_state({n: v[offsets[i]:offsets[i + 1]] for n, v in host.items()})
                for i in range(len(sizes))]

    def _device_state(self, arrays: Mapping[str, np.ndarray]) -> OrtDeviceState:
        """Host arrays (any state's names) -> a device state with a zeroed spare set."""
        current = {n: self._to_device(a) for n, a in arrays.items()}
        spare = {n: self._to_device(np.zeros_like(a)) for n, a in arrays.items()}
        return OrtDeviceState(current, spare, int(next(iter(arrays.values())).shape[0]))

    def run(self, inputs: Mapping[str, np.ndarray], state: OrtDeviceState | None = None,
            context: OrtDeviceState | Mapping[str, np.ndarray] | None = None):
        """One step. Shapes: the stage contract's, ``[B, ...]``.

        Returns:
            (data outputs as host arrays, the next state or None).
        """
        batch = check_host_feed(self._data_only, inputs)
        binding = self.session.io_binding()
        for spec in self.contract.data_inputs:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(inputs[spec.name]))
        self._bind_context(binding, context, batch)
        for spec in self.contract.data_outputs:
            binding.bind_output(spec.name, "cpu")  # copied to the host by ORT, nothing else is
        if self.contract.states:
            if isinstance(state, Mapping):
                state = self.state_from_host(state)  # a host state (parity runs) is uploaded once
            if not isinstance(state, OrtDeviceState) or state.batch != batch:
                got = f"batch {state.batch}" if isinstance(state, OrtDeviceState) else type(state).__name__
                raise ValueError(f"{self.name}: state expected an OrtDeviceState of batch {batch} "
                                 f"(from initial_state), got {got}")
            for name in self.contract.state_names:
                binding.bind_ortvalue_input(name, state.current[name])
                binding.bind_ortvalue_output(f"next_{name}", state.spare[name])
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        outputs = {s.name: values[i].numpy() for i, s in enumerate(self.contract.data_outputs)}
        if not self.contract.states:
            return outputs, None
        state.swap()
        return outputs, state

    def _bind_context(self, binding, context, batch: int) -> None:
        if not self.contract.context:
            return
        if isinstance(context, OrtDeviceState):
            if context.batch != batch:
                raise ValueError(f"{self.name}: context batch expected {batch}, got {context.batch}")
            for spec in self.contract.context:
                binding.bind_ortvalue_input(spec.name, context.current[spec.name])
            return
        check_host_feed(dataclasses.replace(self.contract, data_inputs=(), states=()), {}, None, context)
        for spec in self.contract.context:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(context[spec.name]))


def load_stage(artifacts, stage: str, **options: Any) -> OrtCudaStage:
    """Backend-registry entry point: ``options`` as for :class:`OrtCudaStage`."""
    return OrtCudaStage(artifacts.stage_path(stage), artifacts.contract(stage), **options)
