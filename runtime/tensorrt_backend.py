"""TensorRT backend: one deserialized engine per stage, states resident on the GPU.

Runs plans written by ``echostream build-engines`` with TensorRT's name-based API (10.x and 11.x):
``set_input_shape`` when the batch changes, ``set_tensor_address`` for every I/O tensor,
``execute_async_v3`` on a non-default stream. CUDA itself is driven through cuda-python
(``cuda.bindings.runtime``), so this module needs neither torch nor pycuda (nor polygraphy).

At load the engine's I/O is checked against the stage contract: names, input/output modes, dtypes
and static shapes (batch axis -1, every other axis the contract's), because every buffer is sized
from the contract. A plan whose manifest entry says it was built with another TensorRT version or
on another GPU model is refused first (:func:`check_plan_compatible`). Plans are executable
artifacts: only load plans from folders you trust.

Memory (DESIGN §6): a :class:`TrtState` owns two device buffers per state tensor. A step reads
``s`` from the *current* set and writes ``next_s`` into the *spare* set, then the two swap roles:
no state byte crosses PCIe between steps. State buffers come from a per-stage pool
(:class:`DevicePool`): a state that is dropped (or :meth:`TrtState.release`-d) gives its buffers
back, so the snapshots the MT policy takes with :meth:`TrtStage.copy_state` once per token and the
states of finished streams are reused instead of ``cudaMalloc``-ed. Data inputs and outputs go
through pinned host staging buffers (``cudaMallocHost``) and device buffers kept per (tensor,
batch size), so a batch size that alternates between calls reuses its buffers too.

Optional CUDA graphs (``cuda_graphs=True``), the recipe of ``trtexec --useCudaGraph``: a call whose
(batch, tensor addresses) has no graph yet runs one plain enqueue, synchronises the stream, and then
captures the same enqueue into a graph (so lazy initialisation is never captured); later calls with
that key replay it. Ping-pong means each stream state alternates between two address sets, so a
stream uses two graphs. If capture fails (an engine with non-capturable layers, an invalidated
capture, or ``cudaGraphInstantiate`` refusing the graph) the captured graph is destroyed, the CUDA
error is cleared and the stage falls back to plain enqueues for good
(:attr:`TrtStage.cuda_graphs_disabled` says why).

One ``trt.Logger`` serves the whole process (:func:`trt_logger`): TensorRT keeps a pointer to the
logger of every builder and runtime, and ``build-engines`` hands the same one to polygraphy.
"""
from __future__ import annotations

import ctypes
import dataclasses
import sys
import threading
from collections import OrderedDict
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from echostream.contract import BATCH, StageContract, TensorSpec
from echostream.errors import ArtifactError, BackendUnavailable, EchoStreamError
from echostream.runtime.stage import Stage, check_host_feed

TENSORRT_MISSING = (
    "TensorRT is not installed (with an NVIDIA GPU: pip install 'echostream[gpu-cu13]' or "
    "'echostream[gpu-cu12]' --extra-index-url https://pypi.nvidia.com, the CUDA major your driver "
    "supports; on Jetson it ships with JetPack)"
)
CUDA_PYTHON_MISSING = ("the TensorRT backend needs cuda-python for the TensorRT wheel's CUDA major "
                       "(pip install 'echostream[gpu-cu13]' or 'echostream[gpu-cu12]')")
MAX_CUDA_GRAPHS = 32  # per stage; two per live stream (ping-pong)
DEFAULT_POOL_MB = 512  # free state buffers a stage keeps for reuse
CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver


# ---- imports, the process logger, device facts (shared with export/tensorrt_build.py) ----------


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


_LOGGER = None
_LOGGER_LOCK = threading.Lock()
_POLYGRAPHY_TRT_UTIL = "polygraphy.backend.trt.util"


def trt_logger(trt=None):
    """The process's one TensorRT logger (severity WARNING), created on first use.

    Every ``trt.Builder`` and ``trt.Runtime`` of this process gets it: ours, and polygraphy's once
    polygraphy's TensorRT utilities are imported (its global logger is set to this one; if
    polygraphy made its own first, that one is adopted instead). TensorRT keeps a pointer to the
    logger, so it lives as long as the process.
    """
    global _LOGGER
    with _LOGGER_LOCK:
        poly = sys.modules.get(_POLYGRAPHY_TRT_UTIL)
        if _LOGGER is None:
            existing = getattr(poly, "TRT_LOGGER", None) if poly is not None else None
            if existing is not None:
                _LOGGER = existing
            else:
                trt = trt or import_tensorrt()
                _LOGGER = trt.Logger(trt.Logger.WARNING)
        if poly is not None and getattr(poly, "TRT_LOGGER", None) is None:
            poly.TRT_LOGGER = _LOGGER
        return _LOGGER


class CudaError(EchoStreamError):
    """A CUDA runtime call failed after the device was found usable."""


def _error_name(err: Any) -> str:
    return getattr(err, "name", None) or f"CUDA error {int(err)}"


def cuda_call(result: Any, what: str = "CUDA call") -> Any:
    """Unpack cuda-python's ``(error, *values)`` convention, raising on a non-success error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        cudart = import_cudart()
        _, text = cudart.cudaGetErrorString(err)
        raise CudaError(f"{what} failed: {_error_name(err)} "
                        f"({text.decode() if isinstance(text, bytes) else text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_version(result: Any) -> int:
    """A ``cudaDriverGetVersion``/``cudaRuntimeGetVersion`` result as 1000*major + 10*minor, 0 if
    it failed."""
    try:
        err, value = result
    except (TypeError, ValueError):
        return 0
    return int(value) if int(err) == 0 else 0


def _format_cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def insufficient_driver_message(driver: int, runtime: int, bindings: str | None) -> str:
    """One line for ``cudaErrorInsufficientDriver`` (``driver``/``runtime``: 1000*major+10*minor).

    No driver at all reports the same error, told apart by a driver version of 0.
    """
    if driver <= 0:
        return ("no NVIDIA driver is installed (CUDA reports cudaErrorInsufficientDriver); TensorRT "
                "engines need an NVIDIA GPU and its driver")
    wanted = f"CUDA {_format_cuda(runtime)}" if runtime > 0 else "a newer CUDA"
    of = f" of cuda-python {bindings}" if bindings else " of cuda-python"
    major = driver // 1000
    fix = (f"update the driver, or use the CUDA {major} stack: pip install 'echostream[gpu-cu{major}]'"
           if major in (12, 13) else "update the driver (TensorRT 10/11 need CUDA 12 or 13)")
    return (f"the NVIDIA driver supports CUDA {_format_cuda(driver)} only, older than the {wanted}"
            f"{of} (cudaErrorInsufficientDriver): {fix}")


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability of CUDA device ``device``.

    Raises:
        BackendUnavailable: no usable NVIDIA GPU / driver (a driver too old for cuda-python's CUDA
            major says so), or cuda-python missing.
    """
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) == CUDA_ERROR_INSUFFICIENT_DRIVER:
        raise BackendUnavailable(insufficient_driver_message(
            _cuda_version(cudart.cudaDriverGetVersion()), _cuda_version(cudart.cudaRuntimeGetVersion()),
            _distribution_version("cuda-bindings", "cuda-python")))
    if int(err) != 0 or count == 0:
        why = _error_name(err) if int(err) != 0 else "0 devices"
        raise BackendUnavailable(f"no NVIDIA GPU is usable here (CUDA reports {why}); "
                                 "TensorRT engines need one")
    if not 0 <= device < count:
        raise BackendUnavailable(f"CUDA device {device} does not exist (found {count})")
    prop = cuda_call(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


def set_device(device: int) -> None:
    """Make ``device`` current for this thread (before any builder, runtime or allocation)."""
    cuda_call(import_cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


def cuda_major_mismatch(tensorrt_cuda: int | None, cuda_python: str | None) -> str | None:
    """One line when the TensorRT wheel and cuda-python are for different CUDA majors, else None.

    Args:
        tensorrt_cuda: the CUDA major of the installed ``tensorrt-cuXX`` wheel (None: unknown, e.g.
            JetPack's TensorRT).
        cuda_python: the installed cuda-bindings / cuda-python version (None: unknown).
    """
    if tensorrt_cuda is None or not cuda_python:
        return None
    try:
        major = int(cuda_python.split(".")[0])
    except ValueError:
        return None
    if major == tensorrt_cuda:
        return None
    return (f"TensorRT is installed for CUDA {tensorrt_cuda} (tensorrt-cu{tensorrt_cuda}) but "
            f"cuda-python {cuda_python} is for CUDA {major}; one CUDA major for both: "
            f"pip install 'echostream[gpu-cu{tensorrt_cuda}]'")


def installed_cuda_stack_problem() -> str | None:
    """:func:`cuda_major_mismatch` for the installed wheels (read from package metadata)."""
    trt_cuda = None
    for major in (13, 12, 11):
        if _distribution_version(f"tensorrt-cu{major}", f"tensorrt-cu{major}-libs",
                                 f"tensorrt-cu{major}-bindings"):
            trt_cuda = major
            break
    return cuda_major_mismatch(trt_cuda, _distribution_version("cuda-bindings", "cuda-python"))


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


def engine_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The shape TensorRT reports for a contract tensor: -1 on the batch axis."""
    return tuple(-1 if d == BATCH else int(d) for d in spec.shape)


def check_engine_io(engine: Any, trt: Any, contract: StageContract, where: str | Path) -> None:
    """Compare a deserialized engine's I/O tensors with the stage contract.

    Names (as a set), input/output mode, dtype and static shape (``get_tensor_shape``: -1 on the
    batch axis, the contract's size on every other axis) must all match: the runtime sizes every
    buffer from the contract.

    Raises:
        ArtifactError naming the tensor, expected vs got.
    """
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = contract.input_names + contract.output_names
    if sorted(names) != sorted(want):
        raise ArtifactError(f"{where}: engine tensors expected {sorted(want)}, got {sorted(names)}")
    for spec in contract.inputs + contract.outputs:
        mode = engine.get_tensor_mode(spec.name)
        is_input = spec.name in contract.input_names
        if (mode == trt.TensorIOMode.INPUT) != is_input:
            raise ArtifactError(f"{where}: {spec.name!r} expected to be an "
                                f"{'input' if is_input else 'output'}, got {mode}")
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(spec.name)))
        if dtype != np.dtype(spec.dtype):
            raise ArtifactError(f"{where}: {spec.name!r} dtype expected {spec.dtype}, got {dtype}")
        shape = tuple(int(d) for d in engine.get_tensor_shape(spec.name))
        if shape != engine_shape(spec):
            raise ArtifactError(f"{where}: {spec.name!r} shape expected {list(engine_shape(spec))} "
                                f"(-1 = batch), got {list(shape)}")


# ---- device and pinned host memory --------------------------------------------------------------


class DeviceBuffer:
    """One device allocation holding a ``shape``/``dtype`` tensor (freed with the object)."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)  # never a null address
        self._cudart = import_cudart()
        self.ptr = int(cuda_call(self._cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def upload_from(self, host_ptr: int, nbytes: int, stream: Any) -> None:
        cuda_call(self._cudart.cudaMemcpyAsync(
            self.ptr, host_ptr, nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
            "upload")

    def download_to(self, host_ptr: int, nbytes: int, stream: Any) -> None:
        cuda_call(self._cudart.cudaMemcpyAsync(
            host_ptr, self.ptr, nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
            "download")

    def upload(self, array: np.ndarray, stream: Any) -> None:
        """Pageable upload (states from the host: parity and debugging paths)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        self.upload_from(array.ctypes.data, array.nbytes, stream)

    def download(self, stream: Any) -> np.ndarray:
        """Enqueue a copy to a new host array; valid after the stream is synchronised."""
        out = np.empty(self.shape, self.dtype)
        self.download_to(out.ctypes.data, out.nbytes, stream)
        return out

    def copy_from(self, other: "DeviceBuffer", stream: Any) -> None:
        cuda_call(self._cudart.cudaMemcpyAsync(
            self.ptr, other.ptr, self.nbytes,
            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "device copy")

    def copy_rows_from(self, other: "DeviceBuffer", dst_row: int, src_row: int, rows: int,
                       stream: Any) -> None:
        """Copy ``rows`` rows (axis 0) of ``other`` starting at ``src_row`` to row ``dst_row``."""
        row_bytes = self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0
        if other.shape[1:] != self.shape[1:] or other.dtype != self.dtype:
            raise ValueError(f"row copy between {other.dtype}{list(other.shape)} and "
                             f"{self.dtype}{list(self.shape)}")
        cuda_call(self._cudart.cudaMemcpyAsync(
            self.ptr + dst_row * row_bytes, other.ptr + src_row * row_bytes, rows * row_bytes,
            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "device row copy")

    def zero(self, stream: Any) -> None:
        cuda_call(self._cudart.cudaMemsetAsync(self.ptr, 0, self.nbytes, stream), "cudaMemsetAsync")

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            try:
                self._cudart.cudaFree(ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown: the driver frees it anyway
                pass


class PinnedBuffer:
    """Page-locked host memory (``cudaMallocHost``) seen as a numpy array ``array`` of
    ``shape``/``dtype``: copies from it and into it are true asynchronous DMA transfers."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        size = int(np.prod(self.shape)) * self.dtype.itemsize
        self.nbytes = max(1, size)
        self._cudart = import_cudart()
        self.ptr = int(cuda_call(self._cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, np.uint8, count=size).view(self.dtype).reshape(self.shape)

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            try:
                self._cudart.cudaFreeHost(ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class StagingBuffer:
    """A data tensor's device buffer and its pinned host twin, for one batch size."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype):
        self.device = DeviceBuffer(shape, dtype)
        self.host = PinnedBuffer(shape, dtype)

    def upload(self, array: np.ndarray, stream: Any) -> None:
        np.copyto(self.host.array, array, casting="no")
        self.device.upload_from(self.host.ptr, self.host.array.nbytes, stream)

    def start_download(self, stream: Any) -> None:
        self.device.download_to(self.host.ptr, self.host.array.nbytes, stream)

    def result(self) -> np.ndarray:
        """A host copy of the downloaded tensor (call after the stream is synchronised): the
        staging buffer is overwritten by the next call."""
        return self.host.array.copy()


class DevicePool:
    """Free device buffers kept for reuse, keyed by (shape, dtype), up to ``limit_bytes``.

    Buffers beyond the limit are freed when given back. Thread-safe (states give their buffers back
    from ``__del__``, wherever the last reference disappears).
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.free_bytes = 0
        self._free: dict[tuple, list[DeviceBuffer]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: str | np.dtype) -> DeviceBuffer:
        key = (tuple(int(d) for d in shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                buf = free.pop()
                self.free_bytes -= buf.nbytes
                return buf
        return DeviceBuffer(shape, dtype)

    def give(self, buffers: list[DeviceBuffer]) -> None:
        with self._lock:
            for buf in buffers:
                if self.free_bytes + buf.nbytes > self.limit_bytes:
                    continue  # dropped: freed with the object
                self._free.setdefault((buf.shape, buf.dtype.str), []).append(buf)
                self.free_bytes += buf.nbytes


class TrtState:
    """One stream's state of one stage on the GPU: ``current`` is read, ``spare`` written.

    Shapes: every buffer is the contract's state shape with ``B = batch``. The buffers come from
    (and go back to) the stage's :class:`DevicePool`.
    """

    def __init__(self, contract: StageContract, batch: int, pool: DevicePool | None = None):
        self.batch = batch
        take = pool.take if pool is not None else DeviceBuffer
        self.current = {s.name: take(s.concrete_shape(batch), s.dtype) for s in contract.states}
        self.spare = {s.name: take(s.concrete_shape(batch), s.dtype) for s in contract.states}
        self._pool = pool

    @classmethod
    def like(cls, other: "TrtState", batch: int, pool: DevicePool | None) -> "TrtState":
        """Buffers shaped as ``other``'s with ``batch`` rows (``other`` may be another stage's
        state: a context is stacked by the stage that reads it)."""
        state = cls.__new__(cls)
        state.batch, state._pool = batch, pool
        take = pool.take if pool is not None else DeviceBuffer
        shapes = {n: (batch, *b.shape[1:]) for n, b in other.current.items()}
        state.current = {n: take(shape, other.current[n].dtype) for n, shape in shapes.items()}
        state.spare = {n: take(shape, other.current[n].dtype) for n, shape in shapes.items()}
        return state

    def swap(self) -> None:
        """After a step: what was written becomes what is read next (a pointer swap)."""
        self.current, self.spare = self.spare, self.current

    def release(self) -> None:
        """Give the buffers back to the pool now; the state must not be used afterwards."""
        pool, self._pool = getattr(self, "_pool", None), None
        buffers = list(getattr(self, "current", {}).values()) + list(getattr(self, "spare", {}).values())
        self.current, self.spare = {}, {}
        if pool is not None:
            pool.give(buffers)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ---- the stage ----------------------------------------------------------------------------------


class TrtStage(Stage):
    """One stage engine on one GPU.

    Args:
        plan_path: the serialized engine (``<stage>.<precision>.plan``).
        contract: the stage's I/O contract (the engine's tensors must match it).
        entry: the plan's manifest entry; when given, the plan is refused unless it was built with
            this TensorRT version on this GPU model.
        device: CUDA device index.
        cuda_graphs: capture one CUDA graph per (batch, addresses) after a plain enqueue.
        pool_mb: how many MiB of free state buffers the stage keeps for reuse.

    ``run`` consumes its ``state``: the returned next state is the same :class:`TrtState` with its
    buffers swapped. Use :meth:`copy_state` first to keep the old one (speculative decoding).
    """

    def __init__(self, plan_path: str | Path, contract: StageContract, *,
                 entry: Mapping[str, Any] | None = None, device: int = 0, cuda_graphs: bool = False,
                 pool_mb: int = DEFAULT_POOL_MB):
        self.contract, self.path, self.device = contract, Path(plan_path), device
        trt = self._trt = import_tensorrt()
        self._cudart = import_cudart()
        problem = installed_cuda_stack_problem()
        if problem:
            raise BackendUnavailable(problem)
        gpu = gpu_info(device)
        if entry is not None:
            check_plan_compatible(entry, trt.__version__, gpu)
        set_device(device)
        self.engine = self._deserialize(trt)
        check_engine_io(self.engine, trt, contract, self.path)
        first = contract.inputs[0].name
        lo, _, hi = self.engine.get_tensor_profile_shape(first, 0)
        self._batch_range = (int(lo[0]), int(hi[0]))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CudaError(f"{self.path}: cannot create an execution context (out of GPU memory?)")
        self.stream = cuda_call(self._cudart.cudaStreamCreateWithFlags(
            self._cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._staging: dict[tuple[str, int], StagingBuffer] = {}  # data I/O + host context
        self._pool = DevicePool(pool_mb << 20)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.cuda_graphs = cuda_graphs
        self.cuda_graphs_disabled: str | None = None  # why capture failed, once it has
        self._graphs: OrderedDict[tuple, Any] = OrderedDict()

    @classmethod
    def from_artifacts(cls, artifacts, stage: str, **options: Any) -> "TrtStage":
        import_tensorrt()  # a missing TensorRT is the first thing to report, not a missing plan
        entry = engine_entry(artifacts.manifest, stage, artifacts.precision)
        return cls(artifacts.root / entry["file"], artifacts.contract(stage), entry=entry, **options)

    # -- loading

    def _deserialize(self, trt):
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: TensorRT plan is missing")
        runtime = trt.Runtime(trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ArtifactError(f"{self.path}: TensorRT cannot deserialize the plan (corrupt, or "
                                "built by another TensorRT version / for another GPU)")
        self._runtime = runtime  # the engine must not outlive its runtime
        return engine

    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimisation profile 0."""
        return self._batch_range

    # -- state

    def initial_state(self, batch: int = 1) -> TrtState | None:
        if not self.contract.states:
            return None
        state = TrtState(self.contract, batch, self._pool)
        for buf in list(state.current.values()) + list(state.spare.values()):
            buf.zero(self.stream)
        self._sync()
        return state

    def copy_state(self, state: TrtState) -> TrtState:
        """A snapshot (device-to-device copy) in buffers from the stage's pool."""
        copy = TrtState(self.contract, state.batch, self._pool)
        for name, buf in state.current.items():
            copy.current[name].copy_from(buf, self.stream)
        self._sync()
        return copy

    def stack_states(self, states: list[TrtState]) -> TrtState:
        """Streams batched on axis 0 by device-to-device row copies into pooled buffers."""
        batched = TrtState.like(states[0], sum(s.batch for s in states), self._pool)
        for name, buf in batched.current.items():
            row = 0
            for s in states:
                buf.copy_rows_from(s.current[name], row, 0, s.batch, self.stream)
                row += s.batch
        return batched  # ordered on self.stream before the run that reads it

    def split_state(self, state: TrtState, sizes: list[int]) -> list[TrtState]:
        """Per-stream states copied out of a batched one (device to device); the batched
        buffers go back to the pool."""
        out, row = [], 0
        for size in sizes:
            part = TrtState.like(state, size, self._pool)
            for name, buf in part.current.items():
                buf.copy_rows_from(state.current[name], 0, row, size, self.stream)
            out.append(part)
            row += size
        self._sync()
        state.release()
        return out

    def state_to_host(self, state: TrtState) -> dict[str, np.ndarray]:
        host = {name: buf.download(self.stream) for name, buf in state.current.items()}
        self._sync()
        return host

    def state_from_host(self, arrays: Mapping[str, np.ndarray]) -> TrtState:
        """Upload a host state (e.g. a random state for parity tests)."""
        batch = self.check_host_state(arrays)
        state = TrtState(self.contract, batch, self._pool)
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
            buf = self._staging_buffer(spec, batch)
            buf.upload(inputs[spec.name], self.stream)
            addresses[spec.name] = buf.device.ptr
        addresses.update(self._context_addresses(context, batch))
        for spec in self.contract.states:
            addresses[spec.name] = state.current[spec.name].ptr
            addresses[f"next_{spec.name}"] = state.spare[spec.name].ptr
        outputs = {s.name: self._staging_buffer(s, batch) for s in self.contract.data_outputs}
        addresses.update({name: buf.device.ptr for name, buf in outputs.items()})
        self._bind(batch, addresses)
        self._enqueue((batch, tuple(sorted(addresses.items()))))
        for buf in outputs.values():
            buf.start_download(self.stream)
        self._sync()
        host = {name: buf.result() for name, buf in outputs.items()}
        if not self.contract.states:
            return host, None
        state.swap()
        return host, state

    def _check_batch(self, batch: int, state: TrtState | None) -> None:
        lo, hi = self._batch_range
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
            buf = self._staging_buffer(spec, batch)
            buf.upload(context[spec.name], self.stream)
            out[spec.name] = buf.device.ptr
        return out

    def _staging_buffer(self, spec: TensorSpec, batch: int) -> StagingBuffer:
        """The tensor's buffers for this batch size, kept for the life of the stage (the batch is
        bounded by the profile), so alternating batch sizes never reallocate and captured graphs
        keep valid addresses."""
        key = (spec.name, batch)
        buf = self._staging.get(key)
        if buf is None:
            buf = self._staging[key] = StagingBuffer(spec.concrete_shape(batch), spec.dtype)
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

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise CudaError(f"{self.name}: TensorRT enqueue failed (see the TensorRT log)")

    def _enqueue(self, key: tuple) -> None:
        """Replay the key's graph, or run a plain enqueue (and, with graphs on, capture after it)."""
        if self.cuda_graphs:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
                cuda_call(self._cudart.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")
                return
        self._execute()
        if self.cuda_graphs:
            self._sync()  # the plain enqueue with these shapes and addresses has finished
            self._capture(key)

    def _capture(self, key: tuple) -> None:
        """Capture one enqueue into an executable graph for ``key`` (trtexec's recipe).

        Any failure (enqueue refused while capturing, capture invalidated, instantiation refused)
        destroys what was captured, clears the CUDA error and disables graphs for this stage.
        """
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            ok = bool(self.context.execute_async_v3(int(self.stream)))
        except Exception:  # noqa: BLE001 - the capture must be ended whatever happened
            ok = False
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or int(err) != 0:
            if graph is not None and int(graph) != 0:  # captured but unusable: free it
                cudart.cudaGraphDestroy(graph)
            why = "the engine has operations CUDA graphs cannot capture" if not ok else \
                f"cudaStreamEndCapture reported {_error_name(err)}"
            self._capture_failed(why)
            return
        err, exe = cudart.cudaGraphInstantiate(graph, 0)
        cudart.cudaGraphDestroy(graph)
        if int(err) != 0:
            self._capture_failed(f"cudaGraphInstantiate reported {_error_name(err)}")
            return
        self._graphs[key] = exe
        while len(self._graphs) > MAX_CUDA_GRAPHS:
            _, old = self._graphs.popitem(last=False)
            cudart.cudaGraphExecDestroy(old)

    def _capture_failed(self, why: str) -> None:
        self._cudart.cudaGetLastError()  # clear the error the failed capture left behind
        self.cuda_graphs = False
        self.cuda_graphs_disabled = why

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
