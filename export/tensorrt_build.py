"""`echostream build-engines`: TensorRT plans from an artifacts folder's ONNX graphs.

One engine per stage, built on the GPU that will run it (plans are tied to the TensorRT version and
GPU model). Works with TensorRT 10.x and 11.x:

- the network is strongly typed (``STRONGLY_TYPED``: required to opt in on 10.x, always on in 11.x),
  so precision comes from the graph: ``--precision fp16`` builds from ``<stage>.fp16.onnx``
  (``echostream export --precision fp16``), never from the removed ``BuilderFlag.FP16``;
- one optimisation profile per engine: batch min/opt/max, every other axis static (the contract);
- TF32 is off unless ``--tf32`` (TensorRT enables it by default; fp32 parity assumes true fp32);
- workspace limit, ``builder_optimization_level``, and a persistent timing cache that makes rebuilds
  fast (also tied to TensorRT version + GPU);
- parser errors are listed one per node; every plan is written atomically as
  ``<stage>.<precision>.plan`` and recorded in ``manifest.json`` (sha256, size, TensorRT version,
  GPU name + compute capability, build settings), which is itself rewritten atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from echostream.errors import ArtifactError, BackendUnavailable, EchoStreamError
from echostream.runtime.artifacts import MANIFEST, PRECISIONS, read_manifest, sha256_file
from echostream.runtime.tensorrt_backend import (engine_key, gpu_info, import_tensorrt,
                                                 plan_file_name)

DEFAULT_TIMING_CACHE = "tensorrt.timing_cache"


@dataclass(frozen=True)
class BuildSettings:
    """What shapes and how hard TensorRT optimises (recorded in the manifest)."""

    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mb: int = 2048
    opt_level: int = 3
    tf32: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise EchoStreamError(f"--precision expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EchoStreamError("batch profile expected 1 <= --min-batch <= --opt-batch <= "
                                  f"--max-batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if not 0 <= self.opt_level <= 5:
            raise EchoStreamError(f"--opt-level expected 0..5, got {self.opt_level}")
        if self.workspace_mb < 1:
            raise EchoStreamError(f"--workspace-mb expected >= 1, got {self.workspace_mb}")

    def profile(self, shape: list[int]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes for a network input whose axis 0 is the batch."""
        return tuple((b, *shape[1:]) for b in (self.min_batch, self.opt_batch, self.max_batch))


# ---- building one engine ------------------------------------------------------------------------


def strongly_typed_flags(trt) -> int:
    """Network creation flags: STRONGLY_TYPED where the enum has it (10.x opt-in, 11.x default)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def parser_errors(parser, onnx_path: Path) -> list[str]:
    """One line per ONNX parser error: ``<file>: <node> (<op>): <description>``."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = getattr(err, "node_name", lambda: "")() or f"node#{err.node()}"
        op = getattr(err, "node_operator", lambda: "")() or "?"
        lines.append(f"{onnx_path.name}: {node} ({op}): {err.desc()}")
    return lines


def build_engine(trt, logger, onnx_path: Path, settings: BuildSettings,
                 timing_cache: bytes = b"") -> tuple[bytes, bytes]:
    """Parse one ONNX graph and build its serialized engine.

    Returns:
        (plan bytes, updated timing cache bytes).
    Raises:
        ArtifactError: the parser rejects the graph (errors listed per node) or the build fails.
    """
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:  # pybind11 "factory function returned nullptr": no CUDA device
        raise BackendUnavailable(f"TensorRT cannot create a builder (no usable GPU?): {exc}") from None
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser, onnx_path)
        for line in errors:
            print(line, file=sys.stderr)
        raise ArtifactError(f"{onnx_path}: the TensorRT ONNX parser rejected the graph "
                            f"({len(errors)} error(s) above; `echostream lint` explains most)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.builder_optimization_level = settings.opt_level
    if settings.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.add_optimization_profile(_batch_profile(builder, network, onnx_path, settings))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"{onnx_path}: TensorRT failed to build the engine (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _batch_profile(builder, network, onnx_path: Path, settings: BuildSettings):
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        dynamic = [axis for axis, d in enumerate(shape) if d == -1]
        if dynamic != [0]:
            raise ArtifactError(f"{onnx_path}: input {tensor.name!r} has shape {shape}; exactly axis 0 "
                                "(batch) must be dynamic")
        profile.set_shape(tensor.name, *settings.profile(shape))
    return profile


# ---- files and the manifest ---------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over (never a partial file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_engines(root: Path, entries: dict[str, dict[str, Any]], trt_version: str) -> dict[str, Any]:
    """Add plan entries to ``manifest.json`` (``engines`` + ``files`` hashes) atomically."""
    manifest = read_manifest(root)
    manifest.setdefault("engines", {}).update(entries)
    for entry in entries.values():
        manifest["files"][entry["file"]] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    manifest.setdefault("versions", {})["tensorrt"] = trt_version
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def stage_onnx(root: Path, manifest: dict[str, Any], stage: str, precision: str) -> Path:
    try:
        files = manifest["stages"][stage].get("files", {})
    except KeyError:
        raise ArtifactError(f"{root / MANIFEST}: no stage {stage!r}; "
                            f"available: {list(manifest['stages'])}") from None
    if precision not in files:
        hint = " (run `echostream export --precision fp16` first)" if precision == "fp16" else ""
        raise ArtifactError(f"{root}: stage {stage} has no {precision} ONNX graph{hint}")
    return root / files[precision]


def build_folder(root: Path, settings: BuildSettings, stages: list[str] | None = None,
                 timing_cache: Path | None = None, device: int = 0) -> dict[str, dict[str, Any]]:
    """Build every (or the named) stage's plan in an artifacts folder and record them.

    Returns:
        the new manifest entries, keyed ``<stage>.<precision>``.
    """
    trt = import_tensorrt()
    gpu = gpu_info(device)
    manifest = read_manifest(root)
    stages = list(stages or manifest["stages"])
    sources = {s: stage_onnx(root, manifest, s, settings.precision) for s in stages}
    cache_path = timing_cache or root / DEFAULT_TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    entries = {}
    for stage in _progress(stages):
        start = time.perf_counter()
        plan, cache = build_engine(trt, logger, sources[stage], settings, cache)
        name = plan_file_name(stage, settings.precision)
        write_atomic(root / name, plan)
        write_atomic(cache_path, cache)  # persist after every stage: a failed later build keeps it
        key = engine_key(stage, settings.precision)
        entries[key] = {
            "file": name, "stage": stage, "precision": settings.precision,
            "onnx": sources[stage].name, "onnx_sha256": sha256_file(sources[stage]),
            "sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size,
            "tensorrt_version": trt.__version__, "gpu": gpu,
            "build": {**asdict(settings), "strongly_typed": bool(strongly_typed_flags(trt)),
                      "timing_cache": str(cache_path)},
            "build_s": round(time.perf_counter() - start, 2),
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        record_engines(root, {key: entries[key]}, trt.__version__)
    return entries


def _progress(items: list[str]):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="build-engines", unit="stage")


# ---- CLI ----------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="artifacts folder written by `echostream export`")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="which ONNX graphs to build from (fp16 = the <stage>.fp16.onnx variants)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--workspace-mb", type=int, default=2048, help="builder workspace limit")
    parser.add_argument("--opt-level", type=int, default=3,
                        help="builder_optimization_level 0-5 (0-1: fast smoke builds)")
    parser.add_argument("--timing-cache", type=Path, default=None,
                        help=f"persistent timing cache (default: DIR/{DEFAULT_TIMING_CACHE})")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                        help="allow TF32 for fp32 layers (off by default: fp32 parity)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")


def main(args: argparse.Namespace) -> int:
    settings = BuildSettings(args.precision, args.min_batch, args.opt_batch, args.max_batch,
                             args.workspace_mb, args.opt_level, args.tf32)
    root = Path(args.dir)
    import_tensorrt()  # fail fast, in one line, before touching the folder
    gpu_info(args.device)
    if not root.is_dir():
        raise ArtifactError(f"artifacts folder {str(root)!r} does not exist or is not a folder")
    entries = build_folder(root, settings, args.stages, args.timing_cache, args.device)
    for key, entry in entries.items():
        print(f"{key}: {entry['file']} ({entry['bytes'] / 1e6:.1f} MB, {entry['build_s']} s, "
              f"TensorRT {entry['tensorrt_version']} on {entry['gpu']['name']})")
    return 0
