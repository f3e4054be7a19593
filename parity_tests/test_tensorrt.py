"""TensorRT engines and the GPU runtime paths (TensorRT, ONNX Runtime CUDA with IOBinding).

Tests that build or run engines are marked ``tensorrt`` (or ``gpu``) and skip with the reason when
TensorRT or an NVIDIA GPU is missing; nothing here pretends to be an engine. What does run on any
machine: ``build-engines`` failing in one line, the build settings checks, the plan-compatibility
rule, the manifest bookkeeping, and the IOBinding state handling of the ORT backend on the CPU
provider.
"""
from __future__ import annotations

import json
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


@pytest.mark.skipif(_tensorrt_missing() != "TensorRT not installed", reason="TensorRT is installed")
def test_build_engines_without_tensorrt_fails_in_one_line(tmp_path):
    result = _cli("build-engines", str(tmp_path), "--precision", "fp16")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"echostream build-engines: error: {TENSORRT_MISSING}"]
    assert "pip install tensorrt" in result.stderr and "Traceback" not in result.stderr


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
