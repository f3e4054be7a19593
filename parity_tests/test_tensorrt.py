"""TensorRT engines and the GPU runtime paths (TensorRT, ONNX Runtime CUDA with IOBinding).

Tests that build or run engines are marked ``tensorrt`` (or ``gpu``) and skip with the reason when
TensorRT or an NVIDIA GPU is missing; nothing here pretends to be an engine. What does run on any
machine: ``build-engines`` failing in one line, the build settings checks, the plan-compatibility
rule, the manifest bookkeeping, the IOBinding state handling of the ORT backend on the CPU
provider, polygraphy's ONNX Runtime runner on our graphs and its TensorRT loader chain up to the
missing TensorRT import, and (with the stand-ins of ``trt_standins.py``, which record calls and
compute nothing) the TensorRT backend's bookkeeping: device selection, timing-cache fallback,
CUDA-graph capture and fallback, load-time shape checks, buffer reuse, one logger per process, and
the verified-hash cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from echostream.contract import STAGE_NAMES
from echostream.errors import ArtifactError, BackendUnavailable
from echostream.runtime.tensorrt_backend import (TENSORRT_MISSING, check_plan_compatible,
                                                 engine_entry, engine_key, gpu_info,
                                                 import_tensorrt, plan_file_name)

STEPS = 12
GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
ENTRY = {"file": "encoder.fp32.plan", "tensorrt_version": "11.1.0.5", "gpu": dict(GPU)}


def _tensorrt_missing() -> str | None:
    """Why TensorRT engines cannot be built/run here, or None when they can."""
    try:
        import_tensorrt()
    except BackendUnavailable:
        return "TensorRT not installed"
    try:
        gpu_info()
    except BackendUnavailable:
        return "no NVIDIA GPU"
    return None


def _cuda_ep_missing() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime-gpu (CUDAExecutionProvider) not installed"
    try:
        gpu_info()
    except BackendUnavailable:
        return "no NVIDIA GPU"
    return None


needs_tensorrt = pytest.mark.skipif(_tensorrt_missing() is not None,
                                    reason=_tensorrt_missing() or "")
needs_cuda_ep = pytest.mark.skipif(_cuda_ep_missing() is not None, reason=_cuda_ep_missing() or "")


# ---- CPU: failing cleanly -----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "echostream.cli", *args], capture_output=True,
                          text=True, timeout=120)


def _cli_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "echostream.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.skipif(_tensorrt_missing() != "TensorRT not installed", reason="TensorRT is installed")
def test_build_engines_without_tensorrt_fails_in_one_line(tmp_path):
    result = _cli("build-engines", str(tmp_path), "--precision", "fp16")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"echostream build-engines: error: {TENSORRT_MISSING}"]
    assert "pip install 'echostream[gpu-cu13]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(_tensorrt_missing() != "no NVIDIA GPU", reason="needs TensorRT without a GPU")
def test_build_engines_without_gpu_fails_in_one_line(tmp_path):
    result = _cli("build-engines", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "GPU" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--min-batch", "4", "--opt-batch", "2"],
     "batch profile expected 1 <= --min-batch <= --opt-batch <= --max-batch, got 4/2/8"),
    (["--opt-level", "7"], "--opt-level expected 0..5, got 7"),
    (["--workspace-mb", "0"], "--workspace-mb expected >= 1, got 0"),
])
def test_build_engines_rejects_bad_settings_before_anything_else(args, message, tmp_path):
    result = _cli("build-engines", str(tmp_path), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"echostream build-engines: error: {message}"]


def test_tensorrt_backend_unavailable_through_the_registry(tiny_artifacts):
    if _tensorrt_missing() != "TensorRT not installed":
        pytest.skip("TensorRT is installed")
    from echostream.runtime.backends import load_stage

    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        load_stage(tiny_artifacts, "encoder", backend="tensorrt")


def test_batch_profile_shapes():
    from echostream.export.tensorrt_build import BuildSettings

    settings = BuildSettings(min_batch=1, opt_batch=2, max_batch=8)
    assert settings.profile([-1, 35, 80]) == ((1, 35, 80), (2, 35, 80), (8, 35, 80))


# ---- CPU: plan compatibility and manifest bookkeeping --------------------------------------------


def test_plan_compatible_when_everything_matches():
    check_plan_compatible(ENTRY, "11.1.0.5", GPU)  # no exception


@pytest.mark.parametrize("version, gpu, fragment", [
    ("11.2.0.1", GPU, "TensorRT 11.1.0.5 (this machine: 11.2.0.1)"),
    ("10.13.3.9", GPU, "TensorRT 11.1.0.5 (this machine: 10.13.3.9)"),
    ("11.1.0.5", {"name": "NVIDIA A10", "compute_capability": "8.6"},
     "GPU NVIDIA H100 80GB HBM3 sm_9.0 (this machine: NVIDIA A10 sm_8.6)"),
    ("11.1.0.5", {"name": GPU["name"], "compute_capability": "8.9"}, "sm_9.0 (this machine:"),
    ("11.1.0.5", {"name": "NVIDIA H200", "compute_capability": "9.0"}, "(this machine: NVIDIA H200"),
])
def test_plan_from_elsewhere_is_refused(version, gpu, fragment):
    with pytest.raises(ArtifactError) as info:
        check_plan_compatible(ENTRY, version, gpu)
    message = str(info.value)
    assert message.startswith("encoder.fp32.plan: plan was built for ")
    assert fragment in message and "echostream build-engines" in message


def test_plan_entry_without_build_facts_is_refused():
    with pytest.raises(ArtifactError, match="lacks the TensorRT version"):
        check_plan_compatible({"file": "x.plan", "gpu": GPU}, "11.1.0.5", GPU)
    with pytest.raises(ArtifactError, match="lacks the TensorRT version"):
        check_plan_compatible({"file": "x.plan", "tensorrt_version": "11.1.0.5"}, "11.1.0.5", GPU)


def test_missing_engine_entry_says_how_to_build():
    assert engine_key("encoder", "fp16") == "encoder.fp16"
    assert plan_file_name("encoder", "fp16") == "encoder.fp16.plan"
    with pytest.raises(ArtifactError, match=r"build-engines <folder> --precision fp16"):
        engine_entry({"engines": {"encoder.fp32": ENTRY}}, "encoder", "fp16")
    assert engine_entry({"engines": {"encoder.fp32": ENTRY}}, "encoder", "fp32") is ENTRY


def test_recorded_plan_is_hash_checked_by_the_loader(tiny_artifacts_copy):
    """record_engines adds the plan to `files` (sha256) atomically; load_artifacts then verifies it.
    The bytes stand in for a plan only as a file to hash: nothing deserializes them."""
    from echostream.export.tensorrt_build import record_engines, write_atomic
    from echostream.runtime.artifacts import load_artifacts, sha256_file

    root = tiny_artifacts_copy
    plan = root / plan_file_name("encoder", "fp32")
    write_atomic(plan, b"\x00" * 64)
    entry = {**ENTRY, "sha256": sha256_file(plan), "bytes": 64}
    record_engines(root, {"encoder.fp32": entry}, "11.1.0.5")
    assert not list(root.glob(".*")), "no temp files may be left behind"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["engines"]["encoder.fp32"]["gpu"] == GPU
    assert manifest["versions"]["tensorrt"] == "11.1.0.5"
    artifacts = load_artifacts(root)
    assert engine_entry(artifacts.manifest, "encoder", "fp32")["file"] == plan.name
    plan.write_bytes(b"\x01" * 64)
    with pytest.raises(ArtifactError, match="sha256 expected"):
        load_artifacts(root)


# ---- CPU: installs, drivers, the verified-hash cache ----------------------------------------------


def test_gpu_extras_pin_one_cuda_major():
    """Each GPU extra pairs a TensorRT wheel with cuda-python (and the CUDA runtime) of the same
    CUDA major: ``cuda-python>=12`` alone resolves to CUDA 13 bindings beside a CUDA 12 TensorRT."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert "gpu" not in extras, "the unpinned gpu extra mixed CUDA majors"
    for major in (12, 13):
        reqs = {r.name: r for r in map(Requirement, extras[f"gpu-cu{major}"])}
        assert f"tensorrt-cu{major}" in reqs and not any(
            n.startswith("tensorrt-cu") and n != f"tensorrt-cu{major}" for n in reqs)
        cuda = reqs["cuda-python"].specifier
        assert cuda.contains(f"{major}.9") and not cuda.contains(f"{major + 1}.0") \
            and not cuda.contains(f"{major - 1}.9"), cuda
        runtime = reqs["nvidia-cuda-runtime-cu12" if major == 12 else "nvidia-cuda-runtime"].specifier
        assert runtime.contains(f"{major}.9") and not runtime.contains(f"{major + 1}.0")
        assert "polygraphy" in reqs
        assert not reqs[f"tensorrt-cu{major}"].specifier.contains("12.0")


@pytest.mark.parametrize("trt_cuda, cuda_python, problem", [
    (12, "12.9.4", None), (13, "13.1.0", None), (None, "13.1.0", None), (12, None, None),
    (12, "13.0.1", "TensorRT is installed for CUDA 12 (tensorrt-cu12) but cuda-python 13.0.1 is for "
                   "CUDA 13; one CUDA major for both: pip install 'echostream[gpu-cu12]'"),
    (13, "12.6.2", "pip install 'echostream[gpu-cu13]'"),
])
def test_cuda_major_mismatch(trt_cuda, cuda_python, problem):
    from echostream.runtime.tensorrt_backend import cuda_major_mismatch

    got = cuda_major_mismatch(trt_cuda, cuda_python)
    assert got == problem if problem is None else problem in got


@pytest.mark.parametrize("driver, runtime, fragment", [
    (12040, 13000, "the NVIDIA driver supports CUDA 12.4 only, older than the CUDA 13.0 of cuda-python "
                   "13.0.1 (cudaErrorInsufficientDriver): update the driver, or use the CUDA 12 stack: "
                   "pip install 'echostream[gpu-cu12]'"),
    (11080, 12060, "update the driver (TensorRT 10/11 need CUDA 12 or 13)"),
    (0, 13000, "no NVIDIA driver is installed (CUDA reports cudaErrorInsufficientDriver)"),
])
def test_insufficient_driver_message(driver, runtime, fragment):
    from echostream.runtime.tensorrt_backend import insufficient_driver_message

    message = insufficient_driver_message(driver, runtime, "13.0.1")
    assert fragment in message and "\n" not in message


def test_build_engines_insufficient_driver_in_one_line(tmp_path):
    """cuda-python 13 on an R550 (CUDA 12.4) driver: cudaGetDeviceCount says
    cudaErrorInsufficientDriver, and the user reads one line saying what to install."""
    from trt_standins import write_standin_stack

    env = write_standin_stack(tmp_path / "site", count=0, count_error=35, driver=12040, runtime=13000)
    result = _cli_env(env, "build-engines", str(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("echostream build-engines: error: the NVIDIA driver supports CUDA 12.4 "
                               "only, older than the CUDA 13.0")
    assert lines[0].endswith("pip install 'echostream[gpu-cu12]'")


def test_build_engines_sets_the_device_before_the_builder(tiny_artifacts_copy, tmp_path):
    """--device 3: cudaSetDevice(3) comes before polygraphy creates trt.Builder, which gets the
    process's one logger. (The stand-in Builder then fails as the real one does without a GPU.)"""
    from trt_standins import write_standin_stack

    env = write_standin_stack(tmp_path / "site", count=4)
    result = _cli_env(env, "build-engines", str(tiny_artifacts_copy), "--device", "3",
                      "--stages", "st_ctc")
    calls = (tmp_path / "site" / "calls.log").read_text().splitlines()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "echostream build-engines: error: TensorRT cannot create a builder (no usable GPU?)")
    assert "Traceback" not in result.stderr
    assert calls == ["cudaSetDevice(3)", "trt.Logger #1", "trt.Builder(logger #1)"], calls
    assert "engines" not in json.loads((tiny_artifacts_copy / "manifest.json").read_text())


def test_parity_without_torch_is_one_line(tiny_artifacts_dir, tmp_path):
    """On a GPU box without PyTorch, `parity --backend tensorrt` says what is missing in one line."""
    from test_bad_input_matrix import block_modules

    env = block_modules(tmp_path / "site", "torch")
    result = _cli_env(env, "parity", str(tiny_artifacts_dir), "--backend", "tensorrt")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "echostream parity: error: parity compares against the PyTorch reference: backend 'torch' is "
        "unavailable (No module named 'torch'); it needs pip install 'echostream[torch]' (PyTorch)"]
    assert result.stdout == ""


def test_plans_are_not_rehashed_when_unchanged(tiny_artifacts_copy, monkeypatch):
    """A plan whose size, mtime, ctime and inode match the verified-hash cache is not read again;
    rehash=True (--verify) reads it; a changed plan is read and refused even when its mtime was put
    back. The bytes stand in for a plan only as a file to hash."""
    import time

    from echostream.export.tensorrt_build import record_engines, write_atomic
    from echostream.runtime import artifacts as artifacts_module
    from echostream.runtime.artifacts import load_artifacts, sha256_file, verified_cache_path

    root = tiny_artifacts_copy
    plan = root / plan_file_name("encoder", "fp32")
    write_atomic(plan, b"\x00" * 4096)
    record_engines(root, {"encoder.fp32": {**ENTRY, "sha256": sha256_file(plan), "bytes": 4096}},
                   "11.1.0.5")
    monkeypatch.setattr(artifacts_module, "_RACY_NS", 0)  # the files here are seconds old
    hashed = []
    real = artifacts_module.sha256_file
    monkeypatch.setattr(artifacts_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))

    load_artifacts(root)
    assert plan.name in hashed and verified_cache_path(root).is_file()
    assert verified_cache_path(root).parent != root and not list(root.glob(".*"))
    hashed.clear()
    load_artifacts(root)
    assert hashed == [], "unchanged files were hashed again"
    load_artifacts(root, rehash=True)
    assert plan.name in hashed and "encoder.onnx" in hashed
    before = plan.stat()
    time.sleep(0.05)
    data = bytearray(plan.read_bytes())
    data[100] ^= 0xFF
    plan.write_bytes(bytes(data))
    os.utime(plan, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    hashed.clear()
    with pytest.raises(ArtifactError, match="encoder.fp32.plan: sha256 expected"):
        load_artifacts(root)
    assert hashed[-1] == plan.name


def test_translate_verify_rehashes(tiny_artifacts_copy):
    """A cache record claiming an altered file is unchanged: the default load trusts it,
    `translate --verify` re-hashes and refuses in one line."""
    from echostream.runtime.artifacts import file_stamp, load_artifacts, verified_cache_path

    root = tiny_artifacts_copy
    manifest = json.loads((root / "manifest.json").read_text())
    target = root / "st_ctc.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    stamps = {name: file_stamp(root / name, entry["sha256"]) for name, entry in manifest["files"].items()}
    verified_cache_path(root).parent.mkdir(parents=True, exist_ok=True)
    verified_cache_path(root).write_text(json.dumps({"root": str(root.resolve()), "files": stamps}))
    load_artifacts(root)  # trusted: the record says unchanged
    from test_bad_input_matrix import chirp, write_audio

    audio = write_audio(root.parent / "in.wav", chirp())
    result = _cli("translate", str(audio), "--artifacts", str(root), "--verify", "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("echostream translate: error: ") and "st_ctc.onnx: sha256 expected" in line


# ---- CPU: build-engines through polygraphy --------------------------------------------------------


class _Config:
    """A builder config stand-in: records what the timing-cache helpers do with it."""

    def __init__(self, accept: bool, serialized: bytes | None = b"new cache"):
        self.accept, self.serialized, self.attached = accept, serialized, []

    def create_timing_cache(self, blob):
        return ("cache", bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        self.attached.append(cache)
        return self.accept or cache == ("cache", b"")

    def get_timing_cache(self):
        if self.serialized is None:
            return None
        return type("Cache", (), {"serialize": lambda _: self.serialized})()


def test_timing_cache_from_another_gpu_is_replaced_by_a_fresh_one():
    from echostream.export.tensorrt_build import attach_timing_cache, timing_cache_bytes

    foreign = _Config(accept=False)
    assert attach_timing_cache(foreign, b"cache from an A10") is False
    assert foreign.attached == [("cache", b"cache from an A10"), ("cache", b"")]
    same = _Config(accept=True)
    assert attach_timing_cache(same, b"cache from this GPU") is True
    assert same.attached == [("cache", b"cache from this GPU")]
    empty = _Config(accept=True)
    assert attach_timing_cache(empty, b"") is False and empty.attached == [("cache", b"")]
    assert timing_cache_bytes(_Config(True)) == b"new cache"
    assert timing_cache_bytes(_Config(True, serialized=None)) is None  # keep the old file


def test_polygraphy_loader_chain_up_to_the_tensorrt_import(tiny_artifacts):
    """The chain is polygraphy's (strongly typed network, CreateConfig with the batch profile, TF32
    off, our PostprocessConfig) and builds nothing until called; calling it without TensorRT is one
    line."""
    from echostream.export.tensorrt_build import BuildSettings, build_engine, engine_loaders
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, PostprocessConfig

    contract = tiny_artifacts.contract("encoder")
    onnx_path = tiny_artifacts.stage_path("encoder")
    settings = BuildSettings(min_batch=1, opt_batch=2, max_batch=6, opt_level=1)
    network, config, record = engine_loaders(onnx_path, contract, settings, b"")
    parse = network._network
    assert isinstance(parse, NetworkFromOnnxPath) and parse.path == str(onnx_path) and parse.strongly_typed
    assert isinstance(config, PostprocessConfig)
    create = config._config
    assert isinstance(create, CreateConfig) and create.tf32 is False
    assert create.builder_optimization_level == 1
    (profile,) = create.profiles
    assert list(profile) == contract.input_names
    for spec in contract.inputs:
        shapes = profile[spec.name]
        assert (shapes.min, shapes.opt, shapes.max) == tuple(spec.concrete_shape(b) for b in (1, 2, 6))
    assert record.config is None  # nothing ran
    if _tensorrt_missing() != "TensorRT not installed":
        pytest.skip("TensorRT is installed")
    with pytest.raises(BackendUnavailable) as info:
        build_engine(onnx_path, contract, settings, tiny_artifacts.root / "never.plan")
    assert str(info.value) == TENSORRT_MISSING


def test_polygraphy_trt_runner_without_tensorrt_is_one_line(tiny_artifacts):
    if _tensorrt_missing() != "TensorRT not installed":
        pytest.skip("TensorRT is installed")
    from echostream.export.parity import trt_runner

    with pytest.raises(BackendUnavailable) as info:
        trt_runner(tiny_artifacts, "encoder")
    assert str(info.value) == TENSORRT_MISSING


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_polygraphy_onnxrt_runner_on_our_graphs(stage, tiny_artifacts):
    """Polygraphy's OnnxrtRunner runs each exported graph from the single-step feeds (data,
    context and a random state as inputs) and agrees with the runtime's own ONNX Runtime stage."""
    pytest.importorskip("torch")
    from echostream.export.parity import _Feeds, onnxrt_runner, single_step_feeds
    from echostream.runtime.onnxruntime_backend import OrtStage

    contract = tiny_artifacts.contract(stage)
    feeds = single_step_feeds(contract, _Feeds(tiny_artifacts.config, 7), iterations=3)
    ours = OrtStage(tiny_artifacts.stage_path(stage), contract, deterministic=True)
    with onnxrt_runner(tiny_artifacts, stage) as runner:
        for feed in feeds:
            assert sorted(feed) == sorted(contract.input_names)
            got = runner.infer(feed)
            data = {s.name: feed[s.name] for s in contract.data_inputs}
            state = {s.name: feed[s.name] for s in contract.states} or None
            context = {s.name: feed[s.name] for s in contract.context} or None
            outputs, next_state = ours.run(data, state, context)
            want = {**outputs, **{f"next_{k}": v for k, v in (next_state or {}).items()}}
            assert sorted(got) == sorted(want) == sorted(contract.output_names)
            for name, value in want.items():
                assert got[name].dtype == value.dtype and got[name].shape == value.shape
                np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5)


def test_polygraphy_rows_compare_two_runners(tiny_artifacts):
    """The parity rows' comparator wiring, with ONNX Runtime on both sides (on a GPU box the DUT
    side is polygraphy's TrtRunner on the plan)."""
    pytest.importorskip("torch")
    from echostream.export.parity import onnxrt_runner, polygraphy_rows, tolerance

    rows = polygraphy_rows(tiny_artifacts, ["st_ctc", "mt_decoder"], iterations=2, seed=0,
                           tol=tolerance("tensorrt", "fp32"),
                           dut_runner=lambda a, s: onnxrt_runner(a, s, name=f"second {s}"),
                           check="polygraphy single step (onnxrt vs onnxrt)")
    assert [(r.stage, r.check) for r in rows] == [
        ("st_ctc", "polygraphy single step (onnxrt vs onnxrt)"),
        ("mt_decoder", "polygraphy single step (onnxrt vs onnxrt)")]
    assert all(r.passed and r.max_abs == 0.0 for r in rows), rows


# ---- CPU: TensorRT backend bookkeeping with stand-ins (they record calls, compute nothing) ---------



def _toy_contract():
    from echostream.contract import StageContract, TensorSpec

    return StageContract("toy", (TensorSpec("x", ("B", 4)),), (TensorSpec("y", ("B", 2)),),
                         states=(TensorSpec("cache", ("B", 3, 4)), TensorSpec("count", ("B",), "int32")))


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """A factory of TrtStages on stand-in TensorRT / cuda-python (installed into the backend);
    ``standin.loggers`` / ``standin.runtime_loggers`` are shared by every stage of the test, as
    one process's would be."""
    from echostream.runtime import tensorrt_backend as backend
    from trt_standins import StandinCudart, StandinTensorRT

    loggers, runtime_loggers = [], []

    def stage(contract=None, *, cudart=None, shapes=None, capture_enqueue_ok=True, **options):
        contract = contract or _toy_contract()
        cudart = cudart or StandinCudart(device_count=4)
        trt = StandinTensorRT(contract, cudart, shapes=shapes, capture_enqueue_ok=capture_enqueue_ok)
        trt.loggers, trt.runtime_loggers = loggers, runtime_loggers
        monkeypatch.setattr(backend, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(backend, "import_cudart", lambda: cudart)
        monkeypatch.setattr(backend, "installed_cuda_stack_problem", lambda: None)
        plan = tmp_path / "toy.plan"
        plan.write_bytes(b"stand-in plan: only read, never run")
        return backend.TrtStage(plan, contract, **options), cudart

    monkeypatch.setattr(backend, "_LOGGER", None)
    stage.loggers, stage.runtime_loggers = loggers, runtime_loggers
    return stage


def _toy_step(stage, state, batch=1):
    return stage.run({"x": np.ones((batch, 4), np.float32)}, state)


def test_device_is_set_before_the_plan_is_deserialized(standin):
    stage, cudart = standin(device=2)
    names = [e[0] for e in cudart.events]
    assert ("cudaSetDevice", 2) in cudart.events
    assert names.index("cudaSetDevice") < names.index("deserialize_cuda_engine")


@pytest.mark.parametrize("shapes, message", [
    ({"x": [-1, 5]}, "'x' shape expected [-1, 4] (-1 = batch), got [-1, 5]"),
    ({"cache": [2, 3, 4]}, "'cache' shape expected [-1, 3, 4] (-1 = batch), got [2, 3, 4]"),
    ({"next_count": [-1, 1]}, "'next_count' shape expected [-1] (-1 = batch), got [-1, 1]"),
])
def test_engine_static_shapes_are_checked_at_load(standin, shapes, message):
    with pytest.raises(ArtifactError) as info:
        standin(shapes=shapes)
    assert str(info.value).endswith(message)


def test_cuda_graph_captured_after_a_synchronised_plain_enqueue(standin):
    stage, cudart = standin(cuda_graphs=True)
    state = stage.initial_state(1)
    graph_events = lambda: [e for e in cudart.events if e[0].startswith(("execute", "cudaStream", "cudaGraph"))]  # noqa: E731
    for _ in range(2):  # ping-pong: two address sets, each captured once
        cudart.events.clear()
        _, state = _toy_step(stage, state)
        assert [e[:2] if e[0] == "execute_async_v3" else e[:1] for e in graph_events()] == [
            ("execute_async_v3", "plain"), ("cudaStreamSynchronize",), ("cudaStreamBeginCapture",),
            ("execute_async_v3", "capturing"), ("cudaStreamEndCapture",), ("cudaGraphInstantiate",),
            ("cudaGraphDestroy",), ("cudaStreamSynchronize",)]
    for _ in range(3):  # replays, no enqueue
        cudart.events.clear()
        _, state = _toy_step(stage, state)
        assert [e[0] for e in graph_events()] == ["cudaGraphLaunch", "cudaStreamSynchronize"]
    assert stage.cuda_graphs and stage.cuda_graphs_disabled is None


@pytest.mark.parametrize("case", ["enqueue refused while capturing", "capture invalidated",
                                  "instantiate refused"])
def test_failed_capture_destroys_the_graph_and_falls_back(standin, case):
    from trt_standins import StandinCudart

    if case == "enqueue refused while capturing":
        cudart, options = StandinCudart(end_capture=(0, 4242)), {"capture_enqueue_ok": False}
    elif case == "capture invalidated":
        cudart, options = StandinCudart(end_capture=(901, None)), {}
    else:
        cudart, options = StandinCudart(end_capture=(0, 4242), instantiate_error=1), {}
    stage, _ = standin(cuda_graphs=True, cudart=cudart, **options)
    state = stage.initial_state(1)
    outputs, state = _toy_step(stage, state)  # no exception: the plain enqueue already ran
    assert outputs["y"].shape == (1, 2)
    names = [e[0] for e in cudart.events]
    destroyed = [e for e in cudart.events if e[0] == "cudaGraphDestroy"]
    assert destroyed == ([] if case == "capture invalidated" else [("cudaGraphDestroy", 4242)])
    assert "cudaGetLastError" in names and "cudaGraphLaunch" not in names
    assert stage.cuda_graphs is False and stage.cuda_graphs_disabled
    cudart.events.clear()
    for _ in range(2):
        _, state = _toy_step(stage, state)
    names = [e[0] for e in cudart.events]
    assert names.count("execute_async_v3") == 2 and "cudaStreamBeginCapture" not in names


def test_staging_buffers_are_pinned_and_reused_when_the_batch_alternates(standin):
    stage, cudart = standin()
    states = {1: stage.initial_state(1), 2: stage.initial_state(2)}
    bound = {}
    for step in range(6):
        batch = 1 + step % 2
        if step == 2:
            cudart.events.clear()
        _, states[batch] = _toy_step(stage, states[batch], batch)
        bound.setdefault(batch, set()).add(stage.context.addresses["x"])
    assert not [e for e in cudart.events if e[0] in ("cudaMalloc", "cudaMallocHost")], \
        "alternating batch sizes reallocated staging buffers"
    assert all(len(ptrs) == 1 for ptrs in bound.values()) and bound[1] != bound[2]
    copies = [e for e in cudart.events if e[0] == "cudaMemcpyAsync"]
    h2d = [e for e in copies if e[4] == cudart.cudaMemcpyKind.cudaMemcpyHostToDevice]
    d2h = [e for e in copies if e[4] == cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost]
    assert len(h2d) == len(d2h) == 4
    assert all(e[2] in cudart.pinned for e in h2d) and all(e[1] in cudart.pinned for e in d2h), \
        "per-step copies must go through pinned host memory"


def test_state_snapshots_come_from_a_pool(standin):
    stage, cudart = standin()
    state = stage.initial_state(1)
    snapshot = stage.copy_state(state)
    pointers = {b.ptr for b in list(snapshot.current.values()) + list(snapshot.spare.values())}
    mallocs = sum(e[0] == "cudaMalloc" for e in cudart.events)
    del snapshot  # the MT policy drops the previous token's snapshot
    again = stage.copy_state(state)
    assert sum(e[0] == "cudaMalloc" for e in cudart.events) == mallocs, "a snapshot was cudaMalloc-ed"
    assert {b.ptr for b in list(again.current.values()) + list(again.spare.values())} == pointers
    copies = [e for e in cudart.events if e[0] == "cudaMemcpyAsync"
              and e[4] == cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice]
    assert len(copies) == 2 * 2  # two snapshots x two state tensors (current only)
    unpooled, cudart2 = standin(pool_mb=0)
    state = unpooled.initial_state(1)
    del state
    before = sum(e[0] == "cudaMalloc" for e in cudart2.events)
    unpooled.initial_state(1)
    assert sum(e[0] == "cudaMalloc" for e in cudart2.events) == before + 4  # limit 0: nothing kept


def test_streams_stack_and_split_by_device_row_copies(standin):
    """decode_streams on TensorRT: states of streams of batch 1 and 2 are stacked into one batch-3
    state by device-to-device row copies at the right offsets, and split back the same way
    (bookkeeping: the stand-in has no memory behind its pointers)."""
    stage, cudart = standin()
    a, b = stage.initial_state(1), stage.initial_state(2)
    cudart.events.clear()
    batched = stage.stack_states([a, b])
    assert batched.batch == 3
    d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    copies = [e for e in cudart.events if e[0] == "cudaMemcpyAsync" and e[4] == d2d]
    for name, buf in batched.current.items():
        row = buf.nbytes // 3
        mine = [e for e in copies if e[1] in (buf.ptr, buf.ptr + row)]
        assert [(e[1] - buf.ptr, e[2], e[3]) for e in mine] == [
            (0, a.current[name].ptr, row), (row, b.current[name].ptr, 2 * row)], name
    cudart.events.clear()
    parts = stage.split_state(batched, [1, 2])
    assert [p.batch for p in parts] == [1, 2] and batched.current == {}
    copies = [e for e in cudart.events if e[0] == "cudaMemcpyAsync" and e[4] == d2d]
    assert len(copies) == 2 * len(parts[0].current)


def test_one_trt_logger_per_process(standin, monkeypatch):
    """Every TrtStage's runtime and polygraphy's TensorRT loaders share one trt.Logger."""
    import polygraphy.backend.trt.util as poly_trt_util

    from echostream.runtime.tensorrt_backend import trt_logger

    monkeypatch.setattr(poly_trt_util, "TRT_LOGGER", None)
    first, _ = standin()
    second, _ = standin()
    assert len(standin.loggers) == 1
    assert standin.runtime_loggers == [standin.loggers[0]] * 2
    assert poly_trt_util.TRT_LOGGER is standin.loggers[0]
    assert trt_logger() is standin.loggers[0]


def test_polygraphy_logger_is_adopted_when_it_came_first(monkeypatch):
    import polygraphy.backend.trt.util as poly_trt_util

    from echostream.runtime import tensorrt_backend as backend

    theirs = object()
    monkeypatch.setattr(backend, "_LOGGER", None)
    monkeypatch.setattr(poly_trt_util, "TRT_LOGGER", theirs)
    assert backend.trt_logger(trt=object()) is theirs  # no new trt.Logger is made


# ---- CPU: the IOBinding state path of the ORT CUDA backend ----------------------------------------


def _feeds(artifacts, stage, batch, gen):
    torch = pytest.importorskip("torch")  # noqa: F841 - the random feeds come from torch
    from echostream.export.onnx_export import random_context, random_data

    contract = artifacts.contract(stage)
    data = {k: v.numpy() for k, v in random_data(contract, artifacts.config, batch, gen).items()}
    context = ({k: v.numpy() for k, v in random_context(contract, batch, gen).items()}
               if contract.context else None)
    return data, context


def _chain_vs_host(artifacts, stage, dut, ref, steps=STEPS, batch=2):
    """Chained steps: ``dut`` (device-state backend) vs ``ref`` (host-state backend)."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(3)
    state_d, state_r = dut.initial_state(batch), ref.initial_state(batch)
    _, context = _feeds(artifacts, stage, batch, gen)
    worst = 0.0
    for _ in range(steps):
        data, _ = _feeds(artifacts, stage, batch, gen)
        out_d, state_d = dut.run(data, state_d, context)
        out_r, state_r = ref.run(data, state_r, context)
        pairs = [(out_r[k], out_d[k]) for k in out_r]
        if state_r is not None:
            host = dut.state_to_host(state_d)
            pairs += [(state_r[k], host[k]) for k in state_r]
        for want, got in pairs:
            assert got.dtype == want.dtype and got.shape == want.shape
            worst = max(worst, float(np.abs(want.astype(np.float64) - got).max()))
    return worst


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_ort_iobinding_ping_pong_matches_plain_ort(stage, tiny_artifacts):
    """The device-state loop (bind current as input, spare as output, swap) on the CPU provider
    gives bit-identical results to ONNX Runtime's plain run()."""
    from echostream.runtime.onnxruntime_backend import OrtStage
    from echostream.runtime.ort_cuda_backend import OrtCudaStage

    path, contract = tiny_artifacts.stage_path(stage), tiny_artifacts.contract(stage)
    dut = OrtCudaStage(path, contract, device="cpu", deterministic=True)
    ref = OrtStage(path, contract, deterministic=True)
    assert _chain_vs_host(tiny_artifacts, stage, dut, ref) == 0.0


def test_ort_iobinding_context_is_bound_by_reference(tiny_artifacts):
    """mt_decoder reads mt_source's device state directly (no host copy) and matches host runs."""
    torch = pytest.importorskip("torch")
    from echostream.runtime.onnxruntime_backend import OrtStage
    from echostream.runtime.ort_cuda_backend import OrtCudaStage, OrtDeviceState

    stages = {}
    for name in ("mt_source", "mt_decoder"):
        path, contract = tiny_artifacts.stage_path(name), tiny_artifacts.contract(name)
        stages[name] = (OrtCudaStage(path, contract, device="cpu", deterministic=True),
                        OrtStage(path, contract, deterministic=True))
    gen = torch.Generator().manual_seed(5)
    (src_d, src_r), (dec_d, dec_r) = stages["mt_source"], stages["mt_decoder"]
    s_d, s_r = src_d.initial_state(2), src_r.initial_state(2)
    for _ in range(3):
        data, _ = _feeds(tiny_artifacts, "mt_source", 2, gen)
        _, s_d = src_d.run(data, s_d)
        _, s_r = src_r.run(data, s_r)
    assert isinstance(s_d, OrtDeviceState)
    d_d, d_r = dec_d.initial_state(2), dec_r.initial_state(2)
    for _ in range(4):
        data, _ = _feeds(tiny_artifacts, "mt_decoder", 2, gen)
        out_d, d_d = dec_d.run(data, d_d, s_d)
        out_r, d_r = dec_r.run(data, d_r, s_r)
        np.testing.assert_array_equal(out_d["y"], out_r["y"])


def test_ort_iobinding_refuses_a_wrong_state(tiny_artifacts):
    from echostream.runtime.ort_cuda_backend import OrtCudaStage

    stage = OrtCudaStage(tiny_artifacts.stage_path("st_ctc"), tiny_artifacts.contract("st_ctc"),
                         device="cpu")
    state = stage.initial_state(1)
    x = np.zeros((2, *tiny_artifacts.contract("st_ctc").data_inputs[0].shape[1:]), np.float32)
    with pytest.raises(ValueError, match="batch 2"):
        stage.run({"x": x}, state)


def test_ort_cuda_refuses_to_fall_back_to_cpu(tiny_artifacts):
    if _cuda_ep_missing() is None:
        pytest.skip("CUDAExecutionProvider is available here")
    from echostream.runtime.ort_cuda_backend import OrtCudaStage

    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        OrtCudaStage(tiny_artifacts.stage_path("encoder"), tiny_artifacts.contract("encoder"))


# ---- GPU: ONNX Runtime CUDA ------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda_ep
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_ort_cuda_matches_ort_cpu(stage, tiny_artifacts):
    from echostream.runtime.onnxruntime_backend import OrtStage
    from echostream.runtime.ort_cuda_backend import OrtCudaStage

    path, contract = tiny_artifacts.stage_path(stage), tiny_artifacts.contract(stage)
    worst = _chain_vs_host(tiny_artifacts, stage, OrtCudaStage(path, contract),
                           OrtStage(path, contract, deterministic=True))
    assert worst <= 1e-4


# ---- GPU: TensorRT engines -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tiny_artifacts_dir, tmp_path_factory):
    """fp32 (TF32 off) and fp16 plans of every tiny stage, built once on this GPU."""
    import shutil

    from echostream.contract import stage_contract
    from echostream.export.fp16 import fp16_path, make_fp16_variant
    from echostream.export.manifest import file_entry
    from echostream.export.tensorrt_build import BuildSettings, build_folder
    from echostream.runtime.artifacts import MANIFEST, load_artifacts

    root = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny_artifacts_dir, root)
    manifest = json.loads((root / MANIFEST).read_text())
    for stage, entry in manifest["stages"].items():  # add fp16 variants the way export does
        out = fp16_path(root / entry["files"]["fp32"])
        make_fp16_variant(root / entry["files"]["fp32"], out, stage_contract(stage, manifest["config"]))
        entry["files"]["fp16"] = out.name
        manifest["files"][out.name] = file_entry(out)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for precision in ("fp32", "fp16"):
        build_folder(root, BuildSettings(precision=precision, max_batch=4, opt_level=1))
    return {p: load_artifacts(root, precision=p) for p in ("fp32", "fp16")}


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_tensorrt_fp32_matches_onnxruntime(stage, engines):
    """12 chained steps, states kept on the GPU; outputs and states within 1e-3 of ORT CPU."""
    from echostream.runtime.onnxruntime_backend import OrtStage
    from echostream.runtime.tensorrt_backend import TrtStage

    artifacts = engines["fp32"]
    ref = OrtStage(artifacts.stage_path(stage), artifacts.contract(stage), deterministic=True)
    assert _chain_vs_host(artifacts, stage, TrtStage.from_artifacts(artifacts, stage), ref) <= 1e-3


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("stage", ["encoder", "mt_decoder", "vocoder"])
def test_tensorrt_cuda_graphs_replay_the_same_results(stage, engines):
    from echostream.runtime.tensorrt_backend import TrtStage

    artifacts = engines["fp32"]
    plain = TrtStage.from_artifacts(artifacts, stage)
    graphs = TrtStage.from_artifacts(artifacts, stage, cuda_graphs=True)
    assert _chain_vs_host_trt(artifacts, stage, graphs, plain) == 0.0


def _chain_vs_host_trt(artifacts, stage, a, b):
    """Two TensorRT stages over the same chained inputs (both keep device states)."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(11)
    sa, sb = a.initial_state(2), b.initial_state(2)
    _, context = _feeds(artifacts, stage, 2, gen)
    worst = 0.0
    for _ in range(STEPS):
        data, _ = _feeds(artifacts, stage, 2, gen)
        oa, sa = a.run(data, sa, context)
        ob, sb = b.run(data, sb, context)
        for k in oa:
            worst = max(worst, float(np.abs(oa[k].astype(np.float64) - ob[k]).max()))
    return worst


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_tensorrt_fp16_matches_fp32_reference(stage, engines):
    from echostream.export.parity import cosine_similarity
    from echostream.export.torch_backend import TorchStage, load_reference_model
    from echostream.runtime.tensorrt_backend import TrtStage

    artifacts = engines["fp16"]
    dut = TrtStage.from_artifacts(artifacts, stage)
    ref = TorchStage(load_reference_model(artifacts), stage)
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(13)
    sd, sr = dut.initial_state(2), ref.initial_state(2)
    _, context = _feeds(artifacts, stage, 2, gen)
    for _ in range(STEPS):
        data, _ = _feeds(artifacts, stage, 2, gen)
        od, sd = dut.run(data, sd, context)
        orf, sr = ref.run(data, sr, context)
        for k in orf:
            assert cosine_similarity(orf[k].astype(np.float64).ravel(),
                                     od[k].astype(np.float64).ravel()) >= 0.999


@pytest.mark.tensorrt
@needs_tensorrt
def test_tensorrt_refuses_a_plan_recorded_for_another_gpu(engines):
    from echostream.runtime.tensorrt_backend import TrtStage

    artifacts = engines["fp32"]
    entry = dict(engine_entry(artifacts.manifest, "encoder", "fp32"))
    entry["gpu"] = {"name": "Some Other GPU", "compute_capability": "7.5"}
    with pytest.raises(ArtifactError, match="plan was built for GPU Some Other GPU"):
        TrtStage(artifacts.root / entry["file"], artifacts.contract("encoder"), entry=entry)


@pytest.mark.tensorrt
@needs_tensorrt
def test_build_records_device_builder_and_timing_cache_reuse(engines):
    """The manifest says which device built each plan, that polygraphy built it, and whether the
    timing cache was reused: the first stage starts from an empty cache, later builds reuse it."""
    entries = engines["fp16"].manifest["engines"]
    first = entries[f"{engines['fp32'].stages[0]}.fp32"]
    assert first["gpu"]["device"] == 0 and first["build"]["builder"].startswith("polygraphy ")
    assert first["build"]["timing_cache_reused"] is False
    assert all(e["build"]["timing_cache_reused"] for k, e in entries.items() if k.endswith(".fp16"))


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_parity_on_tensorrt_has_polygraphy_rows(precision, engines):
    """`parity --backend tensorrt`: our chained rows plus one polygraphy single-step row per stage
    (TrtRunner on the plan vs OnnxrtRunner on the graph), all within the tolerance."""
    pytest.importorskip("torch")
    from echostream.export.parity import POLYGRAPHY_CHECK, run_parity

    rows = run_parity(engines[precision], "tensorrt", steps=3, stages=["st_ctc", "mt_decoder", "vocoder"])
    assert [r.stage for r in rows if r.check == POLYGRAPHY_CHECK] == ["st_ctc", "mt_decoder", "vocoder"]
    assert all(r.passed for r in rows), [(r.stage, r.check, r.max_abs, r.cosine) for r in rows]
