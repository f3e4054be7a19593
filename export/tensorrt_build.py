"""`echostream build-engines`: TensorRT plans from an artifacts folder's ONNX graphs.

One engine per stage, built on the GPU that will run it (plans are tied to the TensorRT version and
GPU model), through polygraphy's TensorRT loaders (TensorRT 10.x and 11.x):

- ``cudaSetDevice(--device)`` first, so the builder works on the GPU the manifest records;
- ``NetworkFromOnnxPath(strongly_typed=True)`` (``STRONGLY_TYPED``: opt-in on 10.x, always on in
  11.x): precision comes from the graph, so ``--precision fp16`` builds from ``<stage>.fp16.onnx``
  (``echostream export --precision fp16``), never from the removed ``BuilderFlag.FP16``; the parsed
  network's inputs are checked against the stage contract (only axis 0 dynamic, every other axis
  the contract's);
- ``CreateConfig``: one optimisation profile (batch min/opt/max, every other axis static), TF32 off
  unless ``--tf32`` (fp32 parity assumes true fp32), ``builder_optimization_level``; then our
  ``PostprocessConfig`` step sets the workspace limit and attaches the persistent timing cache,
  checking ``set_timing_cache``'s answer: a cache made by another TensorRT version or GPU is
  refused by TensorRT, and the build starts from a fresh one (said once on stderr);
- ``engine_from_network`` builds and deserializes the engine, whose I/O is checked against the
  contract (names, modes, dtypes, static shapes) before ``save_engine`` writes it atomically as
  ``<stage>.<precision>.plan``; the timing cache is saved after every stage (a ``None`` from
  ``get_timing_cache`` keeps the old file);
- every plan is recorded in ``manifest.json`` (sha256, size, TensorRT version, GPU name + compute
  capability, build settings, polygraphy version), which is itself rewritten atomically.

Builder, parser and runtime share the process's one ``trt.Logger``
(:func:`echostream.runtime.tensorrt_backend.trt_logger`). Polygraphy's own log goes to stderr at
WARNING and above; a failed parse or build ends with one ``ArtifactError`` line after it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from echostream.contract import StageContract, stage_contract
from echostream.errors import ArtifactError, BackendUnavailable, EchoStreamError
from echostream.atomic import atomic_file
from echostream.runtime.artifacts import MANIFEST, PRECISIONS, read_manifest, sha256_file
from echostream.runtime.tensorrt_backend import (check_engine_io, engine_key, engine_shape,
                                                 gpu_info, import_tensorrt,
                                                 installed_cuda_stack_problem, plan_file_name,
                                                 set_device, trt_logger)

DEFAULT_TIMING_CACHE = "tensorrt.timing_cache"
POLYGRAPHY_MISSING = ("build-engines needs polygraphy (pip install 'echostream[gpu-cu13]' or "
                      "'echostream[gpu-cu12]')")


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


# ---- polygraphy ---------------------------------------------------------------------------------


def polygraphy_api() -> SimpleNamespace:
    """The polygraphy pieces the build uses (importing them does not import TensorRT)."""
    try:
        import polygraphy
        from polygraphy.backend.trt import (CreateConfig, NetworkFromOnnxPath, PostprocessConfig,
                                            PostprocessNetwork, Profile, engine_from_network,
                                            save_engine)
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BackendUnavailable(POLYGRAPHY_MISSING) from None
    return SimpleNamespace(**locals())


@contextlib.contextmanager
def polygraphy_to_stderr(poly: SimpleNamespace):
    """Polygraphy logs to stdout: during a build, its warnings and errors go to stderr instead
    (stdout keeps only our summary lines) and its INFO chatter is dropped."""
    with contextlib.redirect_stdout(sys.stderr), poly.G_LOGGER.verbosity(poly.G_LOGGER.WARNING):
        yield


# ---- building one engine ------------------------------------------------------------------------


def check_network_inputs(network, contract: StageContract, onnx_path: Path) -> None:
    """The parsed network's inputs == the contract's: names, only axis 0 dynamic, static dims."""
    got = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        got[tensor.name] = [int(d) for d in tensor.shape]
    if sorted(got) != sorted(contract.input_names):
        raise ArtifactError(f"{onnx_path}: network inputs expected {sorted(contract.input_names)}, "
                            f"got {sorted(got)}")
    for spec in contract.inputs:
        want, shape = list(engine_shape(spec)), got[spec.name]
        if shape != want:
            raise ArtifactError(f"{onnx_path}: input {spec.name!r} has shape {shape}; expected {want} "
                                "(exactly axis 0, the batch, dynamic)")


def attach_timing_cache(config, blob: bytes) -> bool:
    """Attach ``blob`` as the build's timing cache; True when TensorRT accepted it.

    ``set_timing_cache`` answers False for a cache from another TensorRT version or GPU (its
    header does not match this device): the build then gets a fresh, empty cache instead.
    """
    if blob:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise ArtifactError("TensorRT refused an empty timing cache")
    return False


def timing_cache_bytes(config) -> bytes | None:
    """The build's timing cache to persist, or None when TensorRT has none to give."""
    cache = config.get_timing_cache()
    if cache is None:
        return None
    return bytes(cache.serialize())


def engine_loaders(onnx_path: Path, contract: StageContract, settings: BuildSettings,
                   timing_cache: bytes = b""):
    """Polygraphy's loader chain for one stage engine; nothing runs until it is called.

    Returns:
        (network loader, config loader, record) where ``record.config`` and
        ``record.cache_reused`` are filled in when the config is created during the build.
    """
    poly = polygraphy_api()
    record = SimpleNamespace(config=None, cache_reused=None)
    network = poly.PostprocessNetwork(
        poly.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True),
        func=lambda network: check_network_inputs(network, contract, onnx_path),
        name="check the stage contract")
    profile = poly.Profile()
    for spec in contract.inputs:
        profile.add(spec.name, *settings.profile(list(engine_shape(spec))))

    def finish(builder, network, config):
        trt = import_tensorrt()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
        record.cache_reused = attach_timing_cache(config, timing_cache)
        record.config = config

    config = poly.PostprocessConfig(
        poly.CreateConfig(profiles=[profile], tf32=settings.tf32,
                          builder_optimization_level=settings.opt_level), finish)
    return network, config, record


@dataclass
class EngineBuild:
    """What building one engine produced besides the plan file."""

    timing_cache: bytes | None  # to persist (None: keep the old file)
    cache_reused: bool  # False: the given cache was empty or refused, a fresh one was used


def build_engine(onnx_path: Path, contract: StageContract, settings: BuildSettings, plan_path: Path,
                 timing_cache: bytes = b"") -> EngineBuild:
    """Parse one ONNX graph, build its engine and write the plan to ``plan_path`` atomically.

    Raises:
        BackendUnavailable: TensorRT / polygraphy missing, or no builder can be created.
        ArtifactError: the parser rejects the graph, the build fails, or the engine's I/O does not
            match the contract.
    """
    trt = import_tensorrt()
    poly = polygraphy_api()
    trt_logger(trt)  # polygraphy's builder, parser and runtime get the process logger
    with polygraphy_to_stderr(poly):
        network, config, record = engine_loaders(onnx_path, contract, settings, timing_cache)
        try:
            engine = poly.engine_from_network(network, config=config)
        except poly.PolygraphyException as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else "see the log above"
            raise ArtifactError(f"{onnx_path}: TensorRT could not build the engine ({why}); the log "
                                "above says why (`echostream lint` explains most parser errors)") from None
        except TypeError as exc:  # pybind11 "factory function returned nullptr": no CUDA device
            raise BackendUnavailable(f"TensorRT cannot create a builder (no usable GPU?): {exc}") from None
        check_engine_io(engine, trt, contract, onnx_path)
        _save_engine_atomic(poly, engine, plan_path)
    return EngineBuild(timing_cache_bytes(record.config), bool(record.cache_reused))


def _save_engine_atomic(poly: SimpleNamespace, engine, path: Path) -> None:
    with atomic_file(path, fsync=True) as tmp:
        poly.save_engine(engine, path=tmp)


# ---- files and the manifest ---------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over (never a partial file)."""
    with atomic_file(path, fsync=True) as tmp:
        Path(tmp).write_bytes(data)


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
    poly = polygraphy_api()
    problem = installed_cuda_stack_problem()
    if problem:
        raise BackendUnavailable(problem)
    gpu = gpu_info(device)
    set_device(device)  # every builder below works on the GPU recorded in the manifest
    manifest = read_manifest(root)
    stages = list(stages or manifest["stages"])
    sources = {s: stage_onnx(root, manifest, s, settings.precision) for s in stages}
    contracts = {s: stage_contract(s, manifest["config"]) for s in stages}
    cache_path = timing_cache or root / DEFAULT_TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    entries = {}
    for stage in _progress(stages):
        start = time.perf_counter()
        name = plan_file_name(stage, settings.precision)
        built = build_engine(sources[stage], contracts[stage], settings, root / name, cache)
        if cache and not built.cache_reused:
            print(f"echostream build-engines: {cache_path}: TensorRT refused this timing cache "
                  "(another TensorRT version or GPU); building with a fresh one", file=sys.stderr)
        if built.timing_cache is not None:
            cache = built.timing_cache
            write_atomic(cache_path, cache)  # persist after every stage: a failed later build keeps it
        key = engine_key(stage, settings.precision)
        entries[key] = {
            "file": name, "stage": stage, "precision": settings.precision,
            "onnx": sources[stage].name, "onnx_sha256": sha256_file(sources[stage]),
            "sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size,
            "tensorrt_version": trt.__version__, "gpu": {**gpu, "device": device},
            "build": {**asdict(settings), "strongly_typed": True, "timing_cache": str(cache_path),
                      "timing_cache_reused": built.cache_reused,
                      "builder": f"polygraphy {poly.polygraphy.__version__}"},
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
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (built and recorded)")


def main(args: argparse.Namespace) -> int:
    settings = BuildSettings(args.precision, args.min_batch, args.opt_batch, args.max_batch,
                             args.workspace_mb, args.opt_level, args.tf32)
    root = Path(args.dir)
    import_tensorrt()  # fail fast, in one line, before touching the folder
    polygraphy_api()
    problem = installed_cuda_stack_problem()
    if problem:
        raise BackendUnavailable(problem)
    gpu_info(args.device)
    if not root.is_dir():
        raise ArtifactError(f"artifacts folder {str(root)!r} does not exist or is not a folder")
    entries = build_folder(root, settings, args.stages, args.timing_cache, args.device)
    for key, entry in entries.items():
        print(f"{key}: {entry['file']} ({entry['bytes'] / 1e6:.1f} MB, {entry['build_s']} s, "
              f"TensorRT {entry['tensorrt_version']} on {entry['gpu']['name']})")
    return 0
