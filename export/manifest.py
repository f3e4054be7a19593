"""Writing ``manifest.json``: what an artifacts folder holds and how it was made.

The reader (and the format name/version) lives in the torch-free runtime,
:mod:`echostream.runtime.artifacts`; this module only builds the document:

```
{"format": "echostream-artifacts", "format_version": 1, "created": "...Z",
 "config": {...},                                   # EchoStreamConfig.to_dict()
 "stages": {"encoder": {"contract": {...}, "files": {"fp32": "encoder.onnx"}, "export_s": 1.2}, ...},
 "files": {"encoder.onnx": {"sha256": "...", "bytes": 123}, ...},   # every file in the folder
 "vocab": {"src": "src_dict.txt", "tgt": "tgt_dict.txt", "placeholder": true},
 "cmvn": {"file": "gcmvn.npz", "placeholder": true},
 "reference": {"config": "config.json", "weights": "weights.safetensors"},
 "export": {"exporter": "torch.onnx.export(dynamo=True)", "opset": 18, ...},
 "versions": {"echostream": ..., "torch": ..., "onnx": ..., ...}}
```
"""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from echostream.runtime.artifacts import FORMAT_NAME, FORMAT_VERSION, MANIFEST, sha256_file

VERSIONED_PACKAGES = ("echostream", "torch", "onnx", "onnxruntime", "onnxscript")


def package_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Installed versions of the packages that shape the artifacts (None = not installed)."""
    out: dict[str, str | None] = {}
    for name in (*VERSIONED_PACKAGES, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def hash_folder(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 + size of every regular file under ``root`` except the manifest, by relative path."""
    return {
        p.relative_to(root).as_posix(): file_entry(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def build_manifest(root: Path, config: dict[str, Any], stages: dict[str, dict[str, Any]],
                   export_info: dict[str, Any], vocab: dict[str, Any] | None = None,
                   cmvn: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest for a finished folder; hashes every file already in ``root``.

    Args:
        stages: stage -> ``{"contract": StageContract.to_dict(), "files": {precision: name}, ...}``.
        export_info: exporter name, opset, example batch, ... (recorded as is).
    """
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": config,
        "stages": stages,
        "files": hash_folder(root),
        "vocab": vocab or {},
        "cmvn": cmvn or {},
        "reference": {"config": "config.json", "weights": "weights.safetensors"},
        "export": export_info,
        "versions": {**package_versions(), "exporter": export_info.get("exporter"),
                     "opset": export_info.get("opset")},
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def add_files(root: Path, names: Iterable[str], section: str | None = None,
              entries: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record files added to an existing folder (e.g. TensorRT plans) and rewrite the manifest.

    Args:
        names: paths relative to ``root`` to hash and list.
        section / entries: optionally store ``entries`` under ``manifest[section]`` (e.g. build
            settings and GPU name for plans).
    Returns:
        the updated manifest.
    """
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    for name in names:
        manifest["files"][name] = file_entry(root / name)
    if section is not None:
        manifest[section] = entries or {}
    write_manifest(root, manifest)
    return manifest
