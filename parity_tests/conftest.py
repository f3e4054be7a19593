"""Shared fixtures: the tiny model and its exported artifacts (exported once, reused).

Fixtures:
- ``tiny_config`` (session): ``get_preset("tiny")``.
- ``tiny_model`` (session): the seeded tiny ``EchoStreamModel`` (``build_model``), eval mode.
- ``tiny_artifacts_dir`` (session): a folder written by ``echostream export --preset tiny`` (all 7
  stages, fp32). READ-ONLY: tests that damage files must use ``tiny_artifacts_copy``.
- ``tiny_artifacts`` (session): ``load_artifacts(tiny_artifacts_dir)`` (has ``.root``).
- ``tiny_artifacts_copy`` (function): a private copy of the folder in ``tmp_path``, free to damage.
- ``streamspeech_tiny_artifacts_dir`` (session): the same for the ``streamspeech_tiny`` preset (the
  chunk Conformer encoder stage), cached the same way. READ-ONLY.

Exporting the 7 tiny stages takes 1-3 minutes on 2 shared cores, so the folder is cached in pytest's
cache directory (``.pytest_cache/d/echostream-tiny/<key>``) under a key hashed from every source file
that can change the export (``models/``, the contract, the exporter, the manifest writer/reader)
and the torch/onnx/onnxscript versions. A cached folder is re-verified (hashes, contracts) before use
and re-exported if it fails. ``ECHOSTREAM_FRESH_EXPORT=1`` always exports afresh into a temp folder.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SOURCE_DIRS = ("models",)
_SOURCE_FILES = ("echostream/contract.py", "export/onnx_export.py", "export/commands.py",
                 "export/manifest.py", "runtime/artifacts.py")
_STALE_S = 2 * 3600  # other keys' folders are pruned once untouched this long (another session
                     # running older sources may still be reading a recent one)


def export_cache_key() -> str:
    """Hash of the sources and library versions an export depends on."""
    h = hashlib.sha256()
    files = [p for d in _SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    files += [REPO / f for f in _SOURCE_FILES]
    for path in files:
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    for pkg in ("torch", "onnx", "onnxscript"):
        h.update(f"{pkg}={metadata.version(pkg)}".encode())
    return h.hexdigest()[:16]


def _export_preset(out: Path, preset: str) -> None:
    from echostream.export.commands import export_artifacts

    export_artifacts(out, preset=preset, force=True, progress=False, log=lambda _: None,
                     sentence_graphs=True)


def _usable(folder: Path) -> bool:
    from echostream.errors import ArtifactError
    from echostream.runtime.artifacts import load_artifacts

    try:
        load_artifacts(folder)
    except ArtifactError:
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def _verified_hash_cache(tmp_path_factory):
    """The runtime records verified artifact hashes outside the folders (``ECHOSTREAM_CACHE_DIR``);
    tests keep that record in a session temp folder, not in the user's cache."""
    if "ECHOSTREAM_CACHE_DIR" not in os.environ:
        os.environ["ECHOSTREAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("echostream-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_config():
    from echostream.config import get_preset

    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from echostream.models.weights import build_model

    return build_model(tiny_config)


def _cached_export(request, tmp_path_factory, preset: str) -> Path:
    """``preset`` exported once: into pytest's cache under the source key (see the module doc)."""
    cache = getattr(request.config, "cache", None)
    if os.environ.get("ECHOSTREAM_FRESH_EXPORT") == "1" or cache is None:
        out = tmp_path_factory.mktemp("artifacts") / preset
        _export_preset(out, preset)
        return out
    base = Path(cache.mkdir(f"echostream-{preset.replace('_', '-')}"))
    key = export_cache_key()
    out = base / key / preset
    # Several pytest processes may share the cache: export under an exclusive lock.
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out.is_dir() and _usable(out)):
                now = time.time()
                for stale in base.iterdir():
                    if stale.is_dir() and stale.name != key and now - stale.stat().st_mtime > _STALE_S:
                        shutil.rmtree(stale, ignore_errors=True)
                _export_preset(out, preset)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def tiny_artifacts_dir(request, tmp_path_factory) -> Path:
    return _cached_export(request, tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def streamspeech_tiny_artifacts_dir(request, tmp_path_factory) -> Path:
    return _cached_export(request, tmp_path_factory, "streamspeech_tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_artifacts_dir):
    from echostream.runtime.artifacts import load_artifacts

    return load_artifacts(tiny_artifacts_dir)


@pytest.fixture
def tiny_artifacts_copy(tiny_artifacts_dir, tmp_path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts_dir, out)
    return out


@pytest.fixture(scope="session")
def echostream_artifacts_dir(tmp_path_factory) -> Path:
    """The full-size ``echostream`` preset exported once per session, fp32 and fp16 graphs.

    Only ``@pytest.mark.slow`` tests use it: the export takes 4-6 minutes on 2 CPU cores and the
    folder is about 1 GB (so it is not cached between sessions).
    """
    from echostream.export.commands import export_artifacts

    out = tmp_path_factory.mktemp("artifacts") / "echostream"
    export_artifacts(out, preset="echostream", precision="fp16", force=True, progress=False,
                     log=lambda _: None)
    return out
