"""ONNX Runtime backend: one ``InferenceSession`` per stage graph, host numpy state.

States are plain dicts of numpy arrays owned by the caller (the ``Stream``); a step feeds the data
inputs, the context and the state, and returns the data outputs plus the ``next_*`` outputs re-keyed
by state name, ready to be fed back. Every feed is checked against the contract first so a wrong
shape or dtype fails with a message naming the tensor instead of an ORT stack trace.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from echostream.contract import StageContract
from echostream.errors import ArtifactError, BackendUnavailable
from echostream.runtime.artifacts import Artifacts, check_graph_io
from echostream.runtime.heap import keep_freed_heap
from echostream.runtime.stage import Stage, check_host_feed, zero_host_state

DEVICES = ("cpu", "cuda")

# ONNX Runtime reports element types as "tensor(<type>)".
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
               "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(double)": "float64"}


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share FPUs, so more threads than cores rarely helps)."""
    try:
        import psutil  # optional: a dev dependency, not a runtime one

        cores = psutil.cpu_count(logical=False)
        if cores:
            return int(cores)
    except ImportError:
        pass
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def session_options(threads: int | None = None, deterministic: bool = False,
                    allow_spinning: bool = False) -> ort.SessionOptions:
    """Full graph optimisation; ``threads`` intra-op threads (default: physical cores).

    ``deterministic`` runs one intra- and one inter-op thread so reductions always sum in the same
    order (what parity runs want: results then depend only on the graph, not on scheduling).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if deterministic:
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
    else:
        opts.intra_op_num_threads = int(threads) if threads else physical_cores()
    # A translator holds one session per stage and runs them one after another: spinning pools
    # would keep every idle session's threads busy-waiting on the same cores (measured by
    # `echostream bench`: RTF 0.97 -> 0.54 on 2 cores with spinning off).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.enable_cpu_mem_arena = False  # arenas keep peak-sized blocks per session: 7 sessions
    # The memory pattern is one block for all of a run's intermediates, malloc'ed per run without an
    # arena: above glibc's mmap threshold, so every run page-faulted it in afresh (unit decoder
    # 116 -> 34 ms per call without it, with heap.keep_freed_heap; no stage got slower).
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3  # errors only: ORT's warnings are not the user's problem
    return opts


def providers_for(device: str, device_id: int = 0) -> list[Any]:
    """Execution providers for ``device``; CUDA is refused clearly when this ORT build lacks it."""
    if device not in DEVICES:
        raise ValueError(f"device expected one of {list(DEVICES)}, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(
            "ONNX Runtime CUDAExecutionProvider was asked for but this onnxruntime build only has "
            f"{available}; install onnxruntime-gpu (and uninstall onnxruntime)"
        )
    # use_tf32=0: TF32 matmuls would break fp32 parity (DESIGN §8 tolerances assume true fp32).
    return [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": 0}), "CPUExecutionProvider"]


class OrtStage(Stage):
    """One stage graph on ONNX Runtime.

    Args:
        path: the stage's ``.onnx`` file.
        contract: the stage contract the graph must match (names, dtypes, static dims).
        device: ``"cpu"`` (default) or ``"cuda"``.
        threads: intra-op threads (default: physical cores); ignored when ``deterministic``.
        deterministic: one thread, for bit-stable parity runs.
    """

    def __init__(self, path: str | Path, contract: StageContract, *, device: str = "cpu",
                 device_id: int = 0, threads: int | None = None, deterministic: bool = False):
        self.contract = contract
        self.path = Path(path)
        self.device = device
        keep_freed_heap()
        providers = providers_for(device, device_id)
        self.session = _open_session(self.path, contract.stage,
                                     session_options(threads, deterministic), providers)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailable(f"{self.path}: ONNX Runtime fell back to CPU for the CUDA session")
        check_graph_io(self.path, contract, _io(self.session.get_inputs()),
                       _io(self.session.get_outputs()))
        self._output_names = contract.output_names
        self._zeros: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def from_artifacts(cls, artifacts: Artifacts, stage: str, **options: Any) -> "OrtStage":
        return cls(artifacts.stage_path(stage), artifacts.contract(stage), **options)

    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero state, one read-only set of arrays per batch size shared by every caller: host
        states are never written in place, and a sentence start then allocates (and zero-fills)
        nothing, where a fresh set is tens of MiB per stream on the full preset."""
        if batch not in self._zeros:
            zeros = zero_host_state(self.contract, batch)
            for array in zeros.values():
                array.flags.writeable = False
            self._zeros[batch] = zeros
        return dict(self._zeros[batch])

    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray] | None = None,
            context: Mapping[str, np.ndarray] | None = None):
        """One step. Shapes: see the stage's contract (``[B, ...]`` everywhere).

        Returns:
            (data outputs keyed by contract name, next state keyed by state name or None).
        """
        check_host_feed(self.contract, inputs, state, context)
        feed = {**inputs, **(context or {}), **(state or {})}
        values = self.session.run(self._output_names, feed)
        n_data = len(self.contract.data_outputs)
        outputs = dict(zip(self._output_names[:n_data], values[:n_data]))
        if not self.contract.states:
            return outputs, None
        return outputs, dict(zip(self.contract.state_names, values[n_data:]))


def load_stage(artifacts: Artifacts, stage: str, **options: Any) -> OrtStage:
    """Backend-registry entry point (``echostream.runtime.backends``)."""
    return OrtStage.from_artifacts(artifacts, stage, **options)


def _open_session(path: Path, stage: str, opts: ort.SessionOptions, providers: list[Any]):
    if not path.is_file():
        raise ArtifactError(f"{path}: {stage} graph is missing")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path}: ONNX Runtime cannot load the {stage} graph: {first}") from None


def _io(args) -> list[tuple[str, str, list]]:
    return [(a.name, _ORT_DTYPES.get(a.type, a.type), list(a.shape)) for a in args]
