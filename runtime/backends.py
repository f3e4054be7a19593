"""Backend registry: a backend name -> the module whose ``load_stage(artifacts, stage, **options)``
returns a :class:`~echostream.runtime.stage.Stage`.

Backends are imported lazily, by module name, so that importing the runtime never pulls in
TensorRT, CUDA or torch: the ``torch`` reference backend lives in ``echostream.export`` (it needs the
PyTorch model) and is only imported when asked for.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterable

from echostream.errors import BackendUnavailable
from echostream.runtime.artifacts import Artifacts
from echostream.runtime.stage import Stage

BACKENDS: dict[str, tuple[str, str]] = {
    # name: (module, what to install when it is missing)
    "onnxruntime": ("echostream.runtime.onnxruntime_backend", "pip install onnxruntime (or onnxruntime-gpu)"),
    "onnxruntime-cuda": ("echostream.runtime.ort_cuda_backend",
                         "pip install onnxruntime-gpu (alone, not beside onnxruntime) and an NVIDIA GPU"),
    "tensorrt": ("echostream.runtime.tensorrt_backend",
                 "an NVIDIA GPU and pip install 'echostream[gpu-cu13]' (or gpu-cu12: TensorRT and "
                 "cuda-python of one CUDA major)"),
    "torch": ("echostream.export.torch_backend", "pip install 'echostream[torch]' (PyTorch)"),
}


def backend_module(name: str) -> ModuleType:
    """Import a backend's module, or raise ``BackendUnavailable`` saying what is missing."""
    try:
        module_name, needs = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the backend module itself, or a library it needs
        raise BackendUnavailable(f"backend {name!r} is unavailable ({exc}); it needs {needs}") from None
    if not hasattr(module, "load_stage"):
        raise BackendUnavailable(f"backend {name!r}: {module_name} has no load_stage()")
    return module


def available_backends() -> list[str]:
    """Backends whose modules import on this machine (a GPU may still be needed to run them)."""
    names = []
    for name in BACKENDS:
        try:
            backend_module(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def load_stage(artifacts: Artifacts, stage: str, backend: str = "onnxruntime", **options: Any) -> Stage:
    """One stage of ``artifacts`` on ``backend`` (options go to the backend, e.g. ``threads``)."""
    return backend_module(backend).load_stage(artifacts, stage, **options)


def load_stages(artifacts: Artifacts, backend: str = "onnxruntime", stages: Iterable[str] | None = None,
                **options: Any) -> dict[str, Stage]:
    """Every (or the named) stage of ``artifacts`` on ``backend``, keyed by stage name."""
    module = backend_module(backend)
    return {s: module.load_stage(artifacts, s, **options) for s in (stages or artifacts.stages)}
