"""The bad-input matrix of issue #7, end to end through the ``echostream translate`` CLI.

Every case runs the real console entry point in a fresh interpreter (``python -m echostream.cli``),
as a user or a supervisor script would, and checks what that user sees:

- refused cases: exit status 2, exactly one stderr line ``echostream translate: error: ...`` naming
  the problem, no ``Traceback``, nothing on stdout, no output file created (``--json`` target stays
  absent, no ``.part`` left behind) and an existing ``--out`` file untouched even with ``--force``;
- accepted cases (other rates, channel counts and sample formats, all-silence): exit status 0, a
  16 kHz WAV whose length matches the JSON report, and the report describing the input as it was;
- an existing output is never replaced without ``--force``.

The matrix is the table in ``README.md``; each row is one test id here. Cases that need a
library to be absent (TensorRT, torch) or present in another version (a plan built elsewhere) get it
from stand-in modules put first on ``PYTHONPATH`` (see :func:`block_modules` and
:func:`fake_gpu_stack`), so every case runs the same way on any machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile

RATE = 16000
ERROR_PREFIX = "echostream translate: error: "
SENTINEL = b"an older translation the user wants to keep"


# ---- inputs --------------------------------------------------------------------------------------


def chirp(seconds: float = 0.6, rate: int = RATE) -> np.ndarray:
    """A loud gliding chirp with a syllable-like envelope: ``[n]`` float32 in [-0.5, 0.5]."""
    t = np.arange(int(seconds * rate)) / rate
    sweep = 150.0 + 3000.0 * t / seconds
    envelope = 0.3 + 0.2 * np.sin(2 * np.pi * 3.0 * t)
    return (envelope * np.sin(2 * np.pi * np.cumsum(sweep) / rate)).astype(np.float32)


def write_audio(path: Path, data: np.ndarray, rate: int = RATE, subtype: str | None = None) -> Path:
    soundfile.write(str(path), data, rate, subtype=subtype)
    return path


# ---- environments with libraries missing or faked ------------------------------------------------

_BLOCKER = '''
"""Test stand-in: refuse to import {names} as if they were not installed."""
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
'''


def block_modules(folder: Path, *names: str) -> dict[str, str]:
    """Environment whose interpreter cannot import ``names`` (a ``sitecustomize`` on PYTHONPATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER.format(names=tuple(names)))
    return _prepend_path(folder)


_FAKE_CUDART = '''
"""Test stand-in for cuda-python's runtime: one "{gpu}" (sm_{cc}) and nothing else."""
class _Props:
    name = {gpu!r}.encode()
    major, minor = {major}, {minor}

def cudaGetDeviceCount():
    return 0, 1

def cudaGetDeviceProperties(device):
    return 0, _Props()

def cudaGetErrorString(err):
    return 0, b"no error"

def cudaSetDevice(device):
    raise AssertionError("the plan check must refuse the plan before the device is touched")
'''


def fake_gpu_stack(folder: Path, tensorrt_version: str, gpu: str, cc: str) -> dict[str, str]:
    """Environment where ``import tensorrt`` gives version ``tensorrt_version`` and CUDA reports one
    GPU ``gpu`` of compute capability ``cc`` -- enough for the backend's plan-compatibility check,
    which must refuse a mismatching plan before anything touches a device."""
    major, minor = cc.split(".")
    (folder / "tensorrt").mkdir(parents=True)
    (folder / "tensorrt" / "__init__.py").write_text(f"__version__ = {tensorrt_version!r}\n")
    (folder / "cuda" / "bindings").mkdir(parents=True)
    (folder / "cuda" / "__init__.py").write_text("")
    (folder / "cuda" / "bindings" / "__init__.py").write_text("")
    (folder / "cuda" / "bindings" / "runtime.py").write_text(
        _FAKE_CUDART.format(gpu=gpu, cc=cc, major=major, minor=minor))
    return _prepend_path(folder)


def _prepend_path(folder: Path) -> dict[str, str]:
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(folder) + (os.pathsep + old if old else "")}


# ---- damaging artifacts ------------------------------------------------------------------------


def edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def rehash(root: Path, name: str) -> None:
    """Record ``name``'s current size and sha256 in the manifest (as if it had been exported so)."""
    from echostream.runtime.artifacts import sha256_file

    def update(m: dict) -> None:
        m["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}

    edit_manifest(root, update)


def flip_byte(path: Path) -> None:
    """Change one byte in the middle (same size: only the hash can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def add_foreign_plans(root: Path) -> None:
    """Record a TensorRT plan for every stage as if built with TensorRT 8.6.1 on a Tesla T4."""
    from echostream.export.tensorrt_build import record_engines
    from echostream.runtime.artifacts import sha256_file
    from echostream.runtime.tensorrt_backend import engine_key, plan_file_name

    stages = json.loads((root / "manifest.json").read_text())["stages"]
    entries = {}
    for stage in stages:
        plan = root / plan_file_name(stage, "fp32")
        plan.write_bytes(b"serialized engine built elsewhere " + stage.encode())
        entries[engine_key(stage, "fp32")] = {
            "file": plan.name, "stage": stage, "precision": "fp32", "sha256": sha256_file(plan),
            "bytes": plan.stat().st_size, "tensorrt_version": "8.6.1",
            "gpu": {"name": "Tesla T4", "compute_capability": "7.5"}}
    record_engines(root, entries, "8.6.1")


# ---- the matrix ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One row: ``prepare(tmp, artifacts)`` makes the input and the artifacts folder to use and
    returns ``(input path, artifacts path, extra CLI args, extra environment)``."""

    prepare: Callable[[Path, Path], tuple[Path, Path, list[str], dict[str, str]]]
    fragment: str  # what the error line must say ("" for accepted cases)
    damages_artifacts: bool = False


def _audio(make: Callable[[Path], Path]):
    return lambda tmp, art: (make(tmp), art, [], {})


def _with_artifacts(damage: Callable[[Path], None], extra: list[str] | None = None,
                    env: Callable[[Path], dict[str, str]] | None = None):
    def prepare(tmp: Path, art: Path):
        damage(art)
        return (write_audio(tmp / "in.wav", chirp()), art, list(extra or []),
                env(tmp) if env else {})
    return prepare


def _options(extra: list[str], env: Callable[[Path], dict[str, str]] | None = None):
    return lambda tmp, art: (write_audio(tmp / "in.wav", chirp()), art, extra,
                             env(tmp) if env else {})


def _text_file(tmp: Path) -> Path:
    path = tmp / "notes.wav"
    path.write_text("these are meeting notes, not audio\n" * 20)
    return path


def _empty_file(tmp: Path) -> Path:
    path = tmp / "empty.wav"
    path.write_bytes(b"")
    return path


def _truncated_header(tmp: Path) -> Path:
    good = write_audio(tmp / "good.wav", chirp())
    path = tmp / "truncated.wav"
    path.write_bytes(good.read_bytes()[:30])  # RIFF/WAVE/fmt started, no data chunk
    good.unlink()
    return path


def _bad_sample(value: float) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        x = chirp(1.0)
        x[int(0.75 * RATE)] = value
        return write_audio(tmp / "bad.wav", x, subtype="FLOAT")
    return make


def _missing_folder(tmp: Path, art: Path):
    return write_audio(tmp / "in.wav", chirp()), tmp / "no-such-artifacts", [], {}


def _corrupt_onnx(art: Path) -> None:
    (art / "vocoder.onnx").write_bytes(b"\x08\x07 this is not a protobuf ModelProto" * 50)
    rehash(art, "vocoder.onnx")  # the manifest agrees: only loading the graph can tell


REFUSED: dict[str, Case] = {
    "missing file": Case(lambda tmp, art: (tmp / "nope.wav", art, [], {}), "nope.wav: no such file"),
    "a directory": Case(lambda tmp, art: (tmp, art, [], {}), "is a directory, expected an audio file"),
    "not audio": Case(_audio(_text_file), "not a readable audio file"),
    "empty file": Case(_audio(_empty_file), "empty file (0 bytes)"),
    "zero samples": Case(_audio(lambda tmp: write_audio(tmp / "z.wav", np.zeros(0, np.float32))),
                         "contains no samples"),
    "NaN sample": Case(_audio(_bad_sample(np.nan)), "1 NaN/Inf sample(s), first at 0.750 s"),
    "Inf sample": Case(_audio(_bad_sample(-np.inf)), "1 NaN/Inf sample(s), first at 0.750 s"),
    "float far outside [-1, 1]": Case(_audio(_bad_sample(32767.0)),
                                      "float samples reach |x| = 32767 at 0.750 s; expected [-1, 1]"),
    "truncated wav header": Case(_audio(_truncated_header), "not a readable audio file"),
    "artifacts folder missing": Case(_missing_folder, "does not exist or is not a folder"),
    "stage file missing": Case(_with_artifacts(lambda a: (a / "encoder.onnx").unlink()),
                               "encoder.onnx: listed in the manifest but missing", True),
    "corrupt ONNX file": Case(_with_artifacts(_corrupt_onnx),
                              "ONNX Runtime cannot load the vocoder graph", True),
    "manifest sha256 mismatch": Case(_with_artifacts(lambda a: flip_byte(a / "st_ctc.onnx")),
                                     "st_ctc.onnx: sha256 expected", True),
    "manifest from an incompatible version": Case(
        _with_artifacts(lambda a: edit_manifest(a, lambda m: m.update(format_version=99))),
        "format_version 99 is not supported by this runtime (supported: [2]); upgrade echostream",
        True),
    "plan built for another GPU / TensorRT": Case(
        _with_artifacts(add_foreign_plans, ["--backend", "tensorrt"],
                        lambda tmp: fake_gpu_stack(tmp / "site", "10.9.0", "NVIDIA H100", "9.0")),
        "plan was built for TensorRT 8.6.1 (this machine: 10.9.0) and GPU Tesla T4 sm_7.5 "
        "(this machine: NVIDIA H100 sm_9.0)", True),
    "backend not installed (TensorRT)": Case(  # plans present: only the library is missing
        _with_artifacts(add_foreign_plans, ["--backend", "tensorrt"],
                        lambda tmp: block_modules(tmp / "site", "tensorrt")),
        "TensorRT is not installed", True),
    "backend not installed (torch)": Case(
        _options(["--backend", "torch"], lambda tmp: block_modules(tmp / "site", "torch")),
        "backend 'torch' is unavailable"),
    "segment size the encoder cannot serve": Case(
        _options(["--segment-ms", "100"]),
        "segment size the encoder cannot serve: segment_ms=100; expected a positive multiple of "
        "the exported encoder segment (4 frames x 40 ms = 160 ms)"),
}

# name -> (samples [n] or [n, channels], file sample rate, libsndfile subtype or None = PCM_16)
ACCEPTED: dict[str, tuple[Callable[[], np.ndarray], int, str | None]] = {
    "8 kHz": (lambda: chirp(rate=8000), 8000, None),
    "44.1 kHz": (lambda: chirp(rate=44100), 44100, None),
    "48 kHz": (lambda: chirp(rate=48000), 48000, None),
    "stereo": (lambda: np.stack([chirp(), 0.5 * chirp()], axis=1), RATE, None),
    "6 channels": (lambda: np.stack([chirp() * (k + 1) / 6 for k in range(6)], axis=1), RATE, None),
    "24-bit PCM": (lambda: chirp(), RATE, "PCM_24"),
    "8-bit PCM": (lambda: chirp(), RATE, "PCM_U8"),
    "all-silence": (lambda: np.zeros(int(0.6 * RATE), np.float32), RATE, None),
}


# ---- running the CLI ------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "echostream.cli", "translate", *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    err = proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got:\n{err}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def work(tmp_path) -> Path:
    """Where outputs go: holds a precious existing ``out.wav``."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "out.wav").write_bytes(SENTINEL)
    return folder


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused(name, tmp_path, work, tiny_artifacts_dir):
    case = REFUSED[name]
    artifacts = tiny_artifacts_dir
    if case.damages_artifacts:
        artifacts = tmp_path / "tiny"
        shutil.copytree(tiny_artifacts_dir, artifacts)
    source, artifacts, extra, env = case.prepare(tmp_path, artifacts)
    before = _listing(work)
    threads = [] if "--backend" in extra else ["--threads", "1"]  # onnxruntime only
    proc = run_cli([source, "--artifacts", artifacts, "--out", work / "out.wav", "--json",
                    work / "out.json", "--force", *threads, *extra], env=env)
    assert_one_line_error(proc, case.fragment)
    assert proc.stdout == "", "nothing may be printed before the refusal"
    assert _listing(work) == before, "an output was created, replaced or left partial"


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted(name, tmp_path, tiny_artifacts_dir):
    make, rate, subtype = ACCEPTED[name]
    data = make()
    source = write_audio(tmp_path / "in.wav", data, rate, subtype)
    out, js = tmp_path / "out.wav", tmp_path / "out.json"
    proc = run_cli([source, "--artifacts", tiny_artifacts_dir, "--out", out, "--json", js,
                    "--quiet", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    report = json.loads(js.read_text())
    assert report["input"]["sample_rate"] == rate
    assert report["input"]["channels"] == (data.shape[1] if data.ndim == 2 else 1)
    assert report["input"]["subtype"] == (subtype or "PCM_16")
    assert report["metrics"]["source_ms"] == pytest.approx(600.0, abs=1.0)
    assert [e["type"] for e in report["events"]].count("end") == 1
    assert report["events"][-1]["type"] == "end"
    info = soundfile.info(str(out))
    assert info.samplerate == RATE and info.channels == 1
    assert info.frames == report["speech"]["num_samples"]
    assert not list(tmp_path.glob(".*.part"))


def test_existing_output_needs_force(tmp_path, tiny_artifacts_dir):
    source = write_audio(tmp_path / "in.wav", chirp())
    out = tmp_path / "out.wav"
    out.write_bytes(SENTINEL)
    args = [source, "--artifacts", tiny_artifacts_dir, "--out", out, "--quiet", "--threads", "1"]
    refused = run_cli(args)
    assert_one_line_error(refused, f"--out {out} exists; pass --force to overwrite it")
    assert out.read_bytes() == SENTINEL and refused.stdout == ""
    forced = run_cli([*args, "--force"])
    assert forced.returncode == 0, forced.stderr
    assert soundfile.info(str(out)).samplerate == RATE


def test_matrix_is_documented():
    """Every row tested here is a row of the README's bad-input table, and vice versa."""
    doc = Path(__file__).resolve().parents[1] / "README.md"
    section = doc.read_text().split("### Bad-input matrix", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| case")}
    tested = set(REFUSED) | set(ACCEPTED) | {"existing output without --force"}
    assert tested <= rows, f"undocumented: {sorted(tested - rows)}"
    assert rows - tested <= {"truncated wav data (header intact)"}, sorted(rows - tested)


def test_truncated_data_reads_what_is_there(tmp_path, tiny_artifacts_dir):
    """A file cut mid-data (intact header) is read up to the cut, as libsndfile reports it."""
    good = write_audio(tmp_path / "good.wav", chirp(1.0))
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:44 + 2 * RATE // 2])  # 44-byte header + 0.5 s of int16
    js = tmp_path / "cut.json"
    proc = run_cli([cut, "--artifacts", tiny_artifacts_dir, "--json", js, "--quiet", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(js.read_text())["metrics"]["source_ms"] == pytest.approx(500.0)

