"""Stand-ins for ``tensorrt`` and cuda-python's runtime, for the TensorRT path's bookkeeping on CPU.

They exercise error handling and bookkeeping only: which CUDA calls happen in which order, what is
allocated and reused, what is refused at load. Nothing here computes anything: an "enqueue" only
records that it happened, device pointers are plain integers that no memory stands behind, and the
values of the outputs are whatever the pinned buffers held. Never compare their numbers.

- :class:`StandinCudart` / :class:`StandinTensorRT`: in-process objects; tests install them with
  ``monkeypatch`` on ``echostream.runtime.tensorrt_backend.import_cudart`` / ``import_tensorrt``.
- :func:`write_standin_stack`: importable ``tensorrt`` and ``cuda.bindings.runtime`` modules in a
  folder, for subprocesses (put the folder first on ``PYTHONPATH``); they append what happens to
  the file named by ``$STANDIN_LOG``.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import textwrap
from pathlib import Path

import numpy as np

from echostream.contract import BATCH, StageContract


class StandinCudart:
    """Records every call in ``events`` as ``(name, args...)``; every call succeeds unless told.

    Args:
        end_capture: ``(error, graph handle)`` that ``cudaStreamEndCapture`` returns.
        instantiate_error: the error ``cudaGraphInstantiate`` returns (0: a graph exec is made).
    """

    cudaStreamNonBlocking = 1

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self, events: list | None = None, end_capture=(0, 5000), instantiate_error: int = 0,
                 device_count: int = 1, gpu: str = "Stand-in GPU", cc: tuple[int, int] = (9, 0)):
        self.events = events if events is not None else []
        self.end_capture, self.instantiate_error = end_capture, instantiate_error
        self.device_count, self.gpu, self.cc = device_count, gpu, cc
        self.capturing = False
        self.device = {}  # ptr -> nbytes
        self.pinned = {}  # ptr -> ctypes buffer (real host memory)
        self._next = itertools.count(0x10000, 0x1000)
        self._exec = itertools.count(9000)

    def _log(self, *event):
        self.events.append(event)

    # memory
    def cudaMalloc(self, nbytes):
        ptr = next(self._next)
        self.device[ptr] = nbytes
        self._log("cudaMalloc", ptr, nbytes)
        return 0, ptr

    def cudaFree(self, ptr):
        self.device.pop(ptr, None)
        self._log("cudaFree", ptr)
        return (0,)

    def cudaMallocHost(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        ptr = ctypes.addressof(buf)
        self.pinned[ptr] = buf
        self._log("cudaMallocHost", ptr, nbytes)
        return 0, ptr

    def cudaFreeHost(self, ptr):
        self.pinned.pop(ptr, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self._log("cudaMemcpyAsync", dst, src, nbytes, kind)
        return (0,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        self._log("cudaMemsetAsync", ptr)
        return (0,)

    # streams, devices, errors
    def cudaStreamCreateWithFlags(self, flags):
        return 0, 77

    def cudaStreamSynchronize(self, stream):
        self._log("cudaStreamSynchronize")
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaSetDevice(self, device):
        self._log("cudaSetDevice", device)
        return (0,)

    def cudaGetDeviceCount(self):
        return 0, self.device_count

    def cudaGetDeviceProperties(self, device):
        props = type("Props", (), {"name": self.gpu.encode(), "major": self.cc[0], "minor": self.cc[1]})
        return 0, props()

    def cudaGetErrorString(self, err):
        return 0, b"stand-in error"

    def cudaGetLastError(self):
        self._log("cudaGetLastError")
        return (0,)

    def cudaDriverGetVersion(self):
        return 0, 13000

    def cudaRuntimeGetVersion(self):
        return 0, 13000

    # graphs
    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = True
        self._log("cudaStreamBeginCapture")
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = False
        self._log("cudaStreamEndCapture")
        return self.end_capture

    def cudaGraphInstantiate(self, graph, flags):
        self._log("cudaGraphInstantiate", graph)
        if self.instantiate_error:
            return self.instantiate_error, None
        return 0, next(self._exec)

    def cudaGraphDestroy(self, graph):
        self._log("cudaGraphDestroy", graph)
        return (0,)

    def cudaGraphExecDestroy(self, exe):
        self._log("cudaGraphExecDestroy", exe)
        return (0,)

    def cudaGraphLaunch(self, exe, stream):
        self._log("cudaGraphLaunch", exe)
        return (0,)


class StandinTensorRT:
    """A ``tensorrt`` module whose runtime deserializes any plan into :class:`StandinEngine` of
    ``contract`` (``shapes`` overrides what the engine reports per tensor)."""

    __version__ = "10.9.0.34"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    def __init__(self, contract: StageContract, cudart: StandinCudart, shapes: dict | None = None,
                 capture_enqueue_ok: bool = True, max_batch: int = 4):
        self.contract, self.cudart = contract, cudart
        self.shapes, self.capture_enqueue_ok, self.max_batch = shapes or {}, capture_enqueue_ok, max_batch
        self.loggers, self.runtime_loggers = [], []
        standin = self

        class Logger:
            WARNING = 2

            def __init__(self, severity):
                standin.loggers.append(self)

        class Runtime:
            def __init__(self, logger):
                standin.runtime_loggers.append(logger)

            def deserialize_cuda_engine(self, data):
                standin.cudart._log("deserialize_cuda_engine")
                return StandinEngine(standin)

        self.Logger, self.Runtime = Logger, Runtime

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type


class StandinEngine:
    def __init__(self, trt: StandinTensorRT):
        c = trt.contract
        self.trt, self._inputs = trt, set(c.input_names)
        self._specs = {s.name: s for s in c.inputs + c.outputs}
        self._names = c.input_names + c.output_names
        self.num_io_tensors = len(self._names)

    def get_tensor_name(self, i):
        return self._names[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self._inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._specs[name].dtype

    def get_tensor_shape(self, name):
        default = [-1 if d == BATCH else int(d) for d in self._specs[name].shape]
        return self.trt.shapes.get(name, default)

    def get_tensor_profile_shape(self, name, profile):
        spec = self._specs[name]
        return spec.concrete_shape(1), spec.concrete_shape(1), spec.concrete_shape(self.trt.max_batch)

    def create_execution_context(self):
        return StandinContext(self.trt)


class StandinContext:
    def __init__(self, trt: StandinTensorRT):
        self.trt = trt
        self.addresses = {}

    def set_input_shape(self, name, shape):
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        capturing = self.trt.cudart.capturing
        self.trt.cudart._log("execute_async_v3", "capturing" if capturing else "plain")
        return self.trt.capture_enqueue_ok if capturing else True


# ---- stand-in modules for subprocesses -----------------------------------------------------------

_TENSORRT_MODULE = '''
"""Test stand-in for TensorRT: records loggers and builders in $STANDIN_LOG; builds nothing."""
import os

__version__ = "10.9.0.34"
_loggers = []


def _log(line):
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(line + "\\n")


class Logger:
    WARNING = 2

    def __init__(self, severity=2):
        _loggers.append(self)
        _log(f"trt.Logger #{len(_loggers)}")


class ILogger:
    def __init__(self):
        _loggers.append(self)
        _log(f"trt.ILogger #{len(_loggers)}")


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 1


class Builder:
    def __init__(self, logger):
        index = next(i for i, known in enumerate(_loggers, 1) if known is logger) if any(
            known is logger for known in _loggers) else 0
        _log(f"trt.Builder(logger #{index})")
        # what the real constructor does without a usable GPU
        raise TypeError("pybind11::init(): factory function returned nullptr (stand-in)")
'''

_CUDART_MODULE = '''
"""Test stand-in for cuda-python's runtime: {count} x "{gpu}"; calls recorded in $STANDIN_LOG."""
import os


def _log(line):
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(line + "\\n")


class _Props:
    name = {gpu!r}.encode()
    major, minor = 9, 0


def cudaGetDeviceCount():
    return {count_error}, {count}


def cudaDriverGetVersion():
    return 0, {driver}


def cudaRuntimeGetVersion():
    return 0, {runtime}


def cudaGetDeviceProperties(device):
    return 0, _Props()


def cudaGetErrorString(err):
    return 0, b"stand-in error"


def cudaSetDevice(device):
    _log(f"cudaSetDevice({{device}})")
    return (0,)
'''


def write_standin_stack(folder: Path, *, count: int = 4, gpu: str = "Stand-in GPU",
                        count_error: int = 0, driver: int = 13000, runtime: int = 13000) -> dict[str, str]:
    """Write stand-in ``tensorrt`` and ``cuda.bindings.runtime`` into ``folder``; returns the
    environment (``PYTHONPATH`` first, ``STANDIN_LOG``) for a subprocess that should import them."""
    (folder / "tensorrt").mkdir(parents=True)
    (folder / "tensorrt" / "__init__.py").write_text(textwrap.dedent(_TENSORRT_MODULE))
    (folder / "cuda" / "bindings").mkdir(parents=True)
    (folder / "cuda" / "__init__.py").write_text("")
    (folder / "cuda" / "bindings" / "__init__.py").write_text("")
    (folder / "cuda" / "bindings" / "runtime.py").write_text(textwrap.dedent(_CUDART_MODULE.format(
        count=count, gpu=gpu, count_error=count_error, driver=driver, runtime=runtime)))
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(folder) + (os.pathsep + old if old else ""),
            "STANDIN_LOG": str(folder / "calls.log")}
