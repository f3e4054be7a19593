"""TensorRT backend: one deserialized engine per stage, states resident on the GPU.

Runs plans written by ``echostream build-engines`` with TensorRT's name-based API (10.x and 11.x):
``set_input_shape`` when the batch changes, ``set_tensor_address`` for every I/O tensor,
``execute_async_v3`` on a non-default stream. CUDA itself is driven through cuda-python
(``cuda.bindings.runtime``), so this module needs neither torch nor pycuda.

State handling (DESIGN §6): a :class:`TrtState` owns two device buffers per state tensor. A step
reads ``s`` from the *current* set and writes ``next_s`` into the *spare* set, then the two swap
roles: no state byte crosses PCIe between steps and no buffer is allocated after
:meth:`TrtStage.initial_state`. Only data inputs are uploaded and only data outputs downloaded.

Optional CUDA graphs (``cuda_graphs=True``): the first step with a given set of shapes and
addresses runs normally (warm-up, so lazy initialisation is not captured), the second captures one
enqueue into a graph and later steps replay it. Ping-pong means each stream state alternates
between two address sets, so a stream uses two graphs. If capture fails (an engine with
non-capturable layers) the stage falls back to plain enqueues for good.

Plans are executable artifacts tied to the exact TensorRT version and GPU: a plan is refused with an
:class:`ArtifactError` when the manifest says it was built elsewhere (:func:`check_plan_compatible`);
only load plans from folders you trust.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from echostream.contract import StageContract
from echostream.errors import ArtifactError, BackendUnavailable, EchoStreamError
from echostream.runtime.stage import Stage, check_host_feed

TENSORRT_MISSING = (
    "TensorRT is not installed (pip install tensorrt-cu12 or tensorrt-cu13 "
    "--extra-index-url https://pypi.nvidia.com on a machine with an NVIDIA GPU; "
    "on Jetson it ships with JetPack)"
)
CUDA_PYTHON_MISSING = "the TensorRT backend needs cuda-python (pip install cuda-python)"
MAX_CUDA_GRAPHS = 32  # per stage; two per live stream (ping-pong)


# ---- imports and device facts (shared with export/tensorrt_build.py) ---------------------------


def import_tensorrt():
    """``tensorrt``, or :class:`BackendUnavailable` with one line saying how to get it."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "tensorrt":
            raise BackendUnavailable(TENSORRT_MISSING) from None
        raise BackendUnavailable(f"{TENSORRT_MISSING}: {exc}") from None
    except (ImportError, OSError) as exc:  # bindings without their libraries (libnvinfer, ...)
        raise BackendUnavailable(f"{TENSORRT_MISSING}: {str(exc).splitlines()[0]}") from None
    return trt


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailable(CUDA_PYTHON_MISSING) from None
    return cudart


class CudaError(EchoStreamError):
    """A CUDA runtime call failed after the device was found usable."""


def cuda_call(result: Any, what: str = "CUDA call") -> Any:
    """Unpack cuda-python's ``(error, *values)`` convention, raising on a non-success error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        cudart = import_cudart()
        _, text = cudart.cudaGetErrorString(err)
        raise CudaError(f"{what} failed: {getattr(err, 'name', err)} "
                        f"({text.decode() if isinstance(text, bytes) else text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability of CUDA device ``device``.

    Raises:
        BackendUnavailable: no usable NVIDIA GPU / driver, or cuda-python missing.
    """
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        why = getattr(err, "name", str(err)) if int(err) != 0 else "0 devices"
        raise BackendUnavailable(f"no NVIDIA GPU is usable here (CUDA reports {why}); "
                                 "TensorRT engines need one")
    if not 0 <= device < count:
        raise BackendUnavailable(f"CUDA device {device} does not exist (found {count})")
    prop = cuda_call(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


# ---- manifest entries for plans -----------------------------------------------------------------


def engine_key(stage: str, precision: str) -> str:
    """Key of a plan in ``manifest["engines"]`` (also its file stem): ``encoder.fp16``."""
    return f"{stage}.{precision}"


def plan_file_name(stage: str, precision: str) -> str:
    return f"{engine_key(stage, precision)}.plan"


def engine_entry(manifest: Mapping[str, Any], stage: str, precision: str) -> dict[str, Any]:
    """The manifest entry of a built plan, or an ArtifactError saying how to build it."""
    entry = manifest.get("engines", {}).get(engine_key(stage, precision))
    if entry is None:
        raise ArtifactError(
            f"no TensorRT engine for {stage} ({precision}) in the manifest; run "
            f"`echostream build-engines <folder> --precision {precision}` on the target GPU")
    return entry


def check_plan_compatible(entry: Mapping[str, Any], tensorrt_version: str,
                          gpu: Mapping[str, str]) -> None:
    """Refuse a plan built with another TensorRT version or on another GPU model.

    Args:
        entry: the plan's ``manifest["engines"][key]`` (``file``, ``tensorrt_version``,
            ``gpu: {name, compute_capability}``).
        tensorrt_version: ``tensorrt.__version__`` of this process.
        gpu: :func:`gpu_info` of the device that will run it.
    Raises:
        ArtifactError naming the plan, what it was built with and what is here.
    """
    file = entry.get("file", "plan")
    built_gpu = entry.get("gpu") or {}
    if "tensorrt_version" not in entry or "name" not in built_gpu:
        raise ArtifactError(f"{file}: manifest entry lacks the TensorRT version / GPU it was built "
                            "with; rebuild with `echostream build-engines`")
    problems = []
    if entry["tensorrt_version"] != tensorrt_version:
        problems.append(f"TensorRT {entry['tensorrt_version']} (this machine: {tensorrt_version})")
    if built_gpu["name"] != gpu["name"] or \
            built_gpu.get("compute_capability") != gpu["compute_capability"]:
        problems.append(f"GPU {built_gpu['name']} sm_{built_gpu.get('compute_capability')} "
                        f"(this machine: {gpu['name']} sm_{gpu['compute_capability']})")
    if problems:
        raise ArtifactError(f"{file}: plan was built for {' and '.join(problems)}; plans only run "
                            "where they were built: rebuild with `echostream build-engines`")


# ---- device memory and state --------------------------------------------------------------------


class DeviceBuffer:
    """One device allocation holding a ``shape``/``dtype`` tensor (freed with the object)."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)  # never a null address
        self._cudart = import_cudart()
        self.ptr = int(cuda_call(self._cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def upload(self, array: np.ndarray, stream: Any) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        cuda_call(self._cudart.cudaMemcpyAsync(
            self.ptr, array.ctypes.data, array.nbytes,
            self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "upload")

    def download(self, stream: Any) -> np.ndarray:
        """Enqueue a copy to a new host array; valid after the stream is synchronised."""
        out = np.empty(self.shape, self.dtype)
        cuda_call(self._cudart.cudaMemcpyAsync(
            out.ctypes.data, self.ptr, out.nbytes,
            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "download")
        return out

    def copy_from(self, other: "DeviceBuffer", stream: Any) -> None:
        cuda_call(self._cudart.cudaMemcpyAsync(
            self.ptr, other.ptr, self.nbytes,
            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "device copy")

    def zero(self, stream: Any) -> None:
        cuda_call(self._cudart.cudaMemsetAsync(self.ptr, 0, self.nbytes, stream), "cudaMemsetAsync")

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            try:
                self._cudart.cudaFree(ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown: the driver frees it anyway
                pass


class TrtState:
    """One stream's state of one stage on the GPU: ``current`` is read, ``spare`` written.

    Shapes: every buffer is the contract's state shape with ``B = batch``.
    """

    def __init__(self, contract: StageContract, batch: int):
        self.batch = batch
        self.current = {s.name: DeviceBuffer(s.concrete_shape(batch), s.dtype) for s in contract.states}
        self.spare = {s.name: DeviceBuffer(s.concrete_shape(batch), s.dtype) for s in contract.states}

    def swap(self) -> None:
        """After a step: what was written becomes what is read next (a pointer swap)."""
        self.current, self.spare = self.spare, self.current


# ---- the stage ----------------------------------------------------------------------------------


_LOGGER = None


def _trt_logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


class TrtStage(Stage):
    """One stage engine on one GPU.

    Args:
        plan_path: the serialized engine (``<stage>.<precision>.plan``).
        contract: the stage's I/O contract (the engine's tensors must match it).
        entry: the plan's manifest entry; when given, the plan is refused unless it was built with
            this TensorRT version on this GPU model.
        device: CUDA device index.
        cuda_graphs: capture one CUDA graph per (shapes, addresses) after a warm-up step.

    ``run`` consumes its ``state``: the returned next state is the same :class:`TrtState` with its
    buffers swapped. Use :meth:`copy_state` first to keep the old one (speculative decoding).
    """

    def __init__(self, plan_path: str | Path, contract: StageContract, *,
                 entry: Mapping[str, Any] | None = None, device: int = 0, cuda_graphs: bool = False):
        self.contract, self.path, self.device = contract, Path(plan_path), device
        trt = self._trt = import_tensorrt()
        self._cudart = import_cudart()
        gpu = gpu_info(device)
        if entry is not None:
            check_plan_compatible(entry, trt.__version__, gpu)
        cuda_call(self._cudart.cudaSetDevice(device), "cudaSetDevice")
        self.engine = self._deserialize(trt)
        self._check_engine_io(trt)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CudaError(f"{self.path}: cannot create an execution context (out of GPU memory?)")
        self.stream = cuda_call(self._cudart.cudaStreamCreateWithFlags(
            self._cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._scratch: dict[str, DeviceBuffer] = {}  # data I/O and host-given context, per shape
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.cuda_graphs = cuda_graphs
        self._graphs: OrderedDict[tuple, Any] = OrderedDict()
        self._warm: set[tuple] = set()

    @classmethod
    def from_artifacts(cls, artifacts, stage: str, **options: Any) -> "TrtStage":
        import_tensorrt()  # a missing TensorRT is the first thing to report, not a missing plan
        entry = engine_entry(artifacts.manifest, stage, artifacts.precision)
        return cls(artifacts.root / entry["file"], artifacts.contract(stage), entry=entry, **options)

    # -- loading

    def _deserialize(self, trt):
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: TensorRT plan is missing")
        runtime = trt.Runtime(_trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ArtifactError(f"{self.path}: TensorRT cannot deserialize the plan (corrupt, or "
                                "built by another TensorRT version / for another GPU)")
        self._runtime = runtime  # the engine must not outlive its runtime
        return engine

    def _check_engine_io(self, trt) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        want = self.contract.input_names + self.contract.output_names
        if sorted(names) != sorted(want):
            raise ArtifactError(f"{self.path}: engine tensors expected {sorted(want)}, got {sorted(names)}")
        for spec in self.contract.inputs + self.contract.outputs:
            mode = self.engine.get_tensor_mode(spec.name)
            is_input = spec.name in self.contract.input_names
            if (mode == trt.TensorIOMode.INPUT) != is_input:
                raise ArtifactError(f"{self.path}: {spec.name!r} expected to be an "
                                    f"{'input' if is_input else 'output'}, got {mode}")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(spec.name)))
            if dtype != np.dtype(spec.dtype):
                raise ArtifactError(f"{self.path}: {spec.name!r} dtype expected {spec.dtype}, got {dtype}")

    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimisation profile 0."""
        first = self.contract.inputs[0].name
        lo, _, hi = self.engine.get_tensor_profile_shape(first, 0)
        return int(lo[0]), int(hi[0])

    # -- state

    def initial_state(self, batch: int = 1) -> TrtState | None:
        if not self.contract.states:
            return None
        state = TrtState(self.contract, batch)
        for buf in list(state.current.values()) + list(state.spare.values()):
            buf.zero(self.stream)
        self._sync()
        return state

    def copy_state(self, state: TrtState) -> TrtState:
        copy = TrtState(self.contract, state.batch)
        for name, buf in state.current.items():
            copy.current[name].copy_from(buf, self.stream)
        self._sync()
        return copy

    def state_to_host(self, state: TrtState) -> dict[str, np.ndarray]:
        host = {name: buf.download(self.stream) for name, buf in state.current.items()}
        self._sync()
        return host

    def state_from_host(self, arrays: Mapping[str, np.ndarray]) -> TrtState:
        """Upload a host state (e.g. a random state for parity tests)."""
        check_host_feed(dataclasses.replace(self.contract, data_inputs=(), context=()), {}, arrays)
        batch = int(next(iter(arrays.values())).shape[0])
        state = TrtState(self.contract, batch)
        for name, buf in state.current.items():
            buf.upload(arrays[name], self.stream)
        self._sync()
        return state

    # -- one step

    def run(self, inputs: Mapping[str, np.ndarray], state: TrtState | None = None,
            context: TrtState | Mapping[str, np.ndarray] | None = None):
        """One step. Shapes: the stage contract's, ``[B, ...]``; ``B`` within the profile.

        Args:
            inputs: data inputs as host arrays.
            state: this stage's :class:`TrtState` (consumed, see the class docstring), or host
                arrays keyed by state name, uploaded first.
            context: the state of the stage this one reads (a :class:`TrtState` on the same
                device, bound by pointer) or host arrays (uploaded each call).
        Returns:
            (data outputs as host arrays, the next state or None).
        """
        batch = check_host_feed(dataclasses.replace(self.contract, context=(), states=()), inputs)
        if self.contract.states and isinstance(state, Mapping):
            state = self.state_from_host(state)  # a host state (parity runs) is uploaded once
        self._check_batch(batch, state)
        addresses = {}
        for spec in self.contract.data_inputs:
            buf = self._buffer(spec.name, spec.concrete_shape(batch), spec.dtype)
            buf.upload(inputs[spec.name], self.stream)
            addresses[spec.name] = buf.ptr
        addresses.update(self._context_addresses(context, batch))
        for spec in self.contract.states:
            addresses[spec.name] = state.current[spec.name].ptr
            addresses[f"next_{spec.name}"] = state.spare[spec.name].ptr
        outputs = {s.name: self._buffer(s.name, s.concrete_shape(batch), s.dtype)
                   for s in self.contract.data_outputs}
        addresses.update({name: buf.ptr for name, buf in outputs.items()})
        self._bind(batch, addresses)
        self._enqueue((batch, tuple(sorted(addresses.items()))))
        host = {name: buf.download(self.stream) for name, buf in outputs.items()}
        self._sync()
        if not self.contract.states:
            return host, None
        state.swap()
        return host, state

    def _check_batch(self, batch: int, state: TrtState | None) -> None:
        lo, hi = self.batch_range()
        if not lo <= batch <= hi:
            raise ValueError(f"{self.name}: batch {batch} is outside the engine's profile [{lo}, {hi}]; "
                             "rebuild with a larger --max-batch")
        if self.contract.states:
            if not isinstance(state, TrtState):
                raise ValueError(f"{self.name}: state expected a TrtState from initial_state(), "
                                 f"got {type(state).__name__}")
            if state.batch != batch:
                raise ValueError(f"{self.name}: state batch expected {batch}, got {state.batch}")

    def _context_addresses(self, context, batch: int) -> dict[str, int]:
        if not self.contract.context:
            return {}
        if isinstance(context, TrtState):
            if context.batch != batch:
                raise ValueError(f"{self.name}: context batch expected {batch}, got {context.batch}")
            return {s.name: context.current[s.name].ptr for s in self.contract.context}
        check_host_feed(dataclasses.replace(self.contract, data_inputs=(), states=()), {},
                        None, context)
        out = {}
        for spec in self.contract.context:
            buf = self._buffer(spec.name, spec.concrete_shape(batch), spec.dtype)
            buf.upload(context[spec.name], self.stream)
            out[spec.name] = buf.ptr
        return out

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: str) -> DeviceBuffer:
        buf = self._scratch.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self._scratch[name] = DeviceBuffer(shape, dtype)
        return buf

    def _bind(self, batch: int, addresses: Mapping[str, int]) -> None:
        for spec in self.contract.inputs:
            shape = spec.concrete_shape(batch)
            if self._shapes.get(spec.name) != shape:
                if not self.context.set_input_shape(spec.name, shape):
                    raise ValueError(f"{self.name}: TensorRT refused shape {list(shape)} for {spec.name!r}")
                self._shapes[spec.name] = shape
        for name, ptr in addresses.items():
            if not self.context.set_tensor_address(name, ptr):
                raise CudaError(f"{self.name}: TensorRT refused the address of {name!r}")

    def _enqueue(self, key: tuple) -> None:
        if self.cuda_graphs:
            graph = self._graphs.get(key)
            if graph is None and key in self._warm:
                graph = self._capture(key)
            if graph is not None:
                self._graphs.move_to_end(key)
                cuda_call(self._cudart.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")
                return
            self._warm.add(key)
        if not self.context.execute_async_v3(int(self.stream)):
            raise CudaError(f"{self.name}: TensorRT enqueue failed (see the TensorRT log)")

    def _capture(self, key: tuple):
        """Capture one enqueue into a CUDA graph; on failure disable graphs and return None."""
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        ok = self.context.execute_async_v3(int(self.stream))
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or int(err) != 0:
            cudart.cudaGetLastError()  # clear the sticky capture error
            self.cuda_graphs = False
            return None
        exe = cuda_call(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        cudart.cudaGraphDestroy(graph)
        self._graphs[key] = exe
        while len(self._graphs) > MAX_CUDA_GRAPHS:
            _, old = self._graphs.popitem(last=False)
            cudart.cudaGraphExecDestroy(old)
        return exe

    def _sync(self) -> None:
        cuda_call(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def __del__(self):
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        try:
            for exe in getattr(self, "_graphs", {}).values():
                cudart.cudaGraphExecDestroy(exe)
            if getattr(self, "stream", None) is not None:
                cudart.cudaStreamDestroy(self.stream)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_stage(artifacts, stage: str, **options: Any) -> TrtStage:
    """Backend-registry entry point (``echostream.runtime.backends``): the plan of ``stage`` at the
    artifacts' precision, checked against the manifest's TensorRT version and GPU."""
    return TrtStage.from_artifacts(artifacts, stage, **options)
