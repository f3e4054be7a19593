"""What machine a benchmark ran on, and its measured fp32 GEMM peak at a given thread count.

The peak is *measured*, not taken from a datasheet: a large square fp32 matmul at the benchmark's
thread count, on every engine at hand (ONNX Runtime's MLAS -- the kernels the stage graphs run on --,
PyTorch, and NumPy's BLAS), and the best of them is the machine's compute limit. "Fraction of peak"
for a stage then means "fraction of what this very machine does on an ideal problem".
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .timing import time_calls

VERSIONED = ("echostream", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt",
             "kaldi-native-fbank", "soxr")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers (absent ones left out)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core counts, OS, thread count and library versions."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory = psutil.virtual_memory().total
    except ImportError:
        physical, memory = None, None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "memory_bytes": memory,
        "platform": platform.platform(),
        "threads": threads,
        "versions": versions(),
        "gpu": gpu_name(),
    }


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, or None (no driver, no GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    return name or None


# ---- GEMM peak -----------------------------------------------------------------------------------


def gemm_peak(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """fp32 ``[size, size] @ [size, size]`` GFLOP/s on ONNX Runtime (thread spinning on and off),
    PyTorch and NumPy; the best median is the peak.

    Returns:
        ``{"size", "threads", "engines": {name: {"gflops", "timing"}}, "peak_gflops", "peak_engine"}``;
        an engine that is not installed is left out (NumPy runs in a subprocess so its BLAS thread
        count can be set before it loads).
    """
    flops = 2.0 * size ** 3
    engines: dict[str, dict[str, Any]] = {}
    runners = (("onnxruntime", lambda *a: _ort_gemm(*a, spinning=True)),
               ("onnxruntime_nospin", lambda *a: _ort_gemm(*a, spinning=False)),
               ("torch", _torch_gemm), ("numpy", _numpy_gemm))
    for name, run in runners:
        timing = run(size, threads, repeats)
        if timing is not None:
            engines[name] = {"gflops": flops / timing["median_s"] / 1e9, "timing": timing}
    if not engines:
        raise RuntimeError("no GEMM engine ran (onnxruntime, torch and numpy all failed)")
    best = max(engines, key=lambda k: engines[k]["gflops"])
    return {"size": size, "threads": threads, "engines": engines,
            "peak_gflops": engines[best]["gflops"], "peak_engine": best}


def _ort_gemm(size: int, threads: int, repeats: int, spinning: bool) -> dict[str, Any] | None:
    """One MatMul graph with the right operand as an initializer, like a stage's weights (so MLAS
    pre-packs it, as it does for the stage graphs); intra-op thread spinning on (ORT's default) or
    off (better when other processes share the cores)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((size, size), dtype=np.float32)
    return time_calls(lambda: session.run(None, {"a": a}), repeats, warmup=2).to_dict()


def _torch_gemm(size: int, threads: int, repeats: int) -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
        with torch.inference_mode():
            return time_calls(lambda: torch.mm(a, b), repeats, warmup=2).to_dict()
    finally:
        torch.set_num_threads(before)


_NUMPY_SNIPPET = """
import json, sys, time, statistics
import numpy as np
size, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((size, size), dtype=np.float32)
b = rng.standard_normal((size, size), dtype=np.float32)
for _ in range(2):
    a @ b
s = []
for _ in range(repeats):
    t = time.perf_counter(); a @ b; s.append(time.perf_counter() - t)
print(json.dumps({"min_s": min(s), "median_s": statistics.median(s), "max_s": max(s), "n": len(s)}))
"""


def _numpy_gemm(size: int, threads: int, repeats: int) -> dict[str, Any] | None:
    """NumPy's BLAS reads its thread count once, at import: run it in a child with the env set."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_NUMPY_SNIPPET)
    try:
        out = subprocess.run([sys.executable, f.name, str(size), str(repeats)], env=env,
                             capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])
