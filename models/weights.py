"""Reference weights on disk: one ``<name>.safetensors`` (every parameter and buffer) beside a
``config.json`` (``EchoStreamConfig``), and a seeded, reproducible ``build_model``.

A checkpoint folder::

    config.json            EchoStreamConfig.to_json()
    weights.safetensors    model.state_dict(), tied tensors stored once (aliases in the metadata)

Round trips are bitwise exact. Loading checks the file against the model that ``config.json``
builds and names every missing, unexpected and shape- or dtype-mismatched tensor.

The model class is a parameter (``factory``: config -> nn.Module) so these functions serve any
module; the default is ``EchoStreamModel``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from echostream.atomic import atomic_file

from echostream.config import EchoStreamConfig

ModelFactory = Callable[[EchoStreamConfig], nn.Module]

CONFIG_FILE = "config.json"
DEFAULT_NAME = "weights"
FORMAT = "echostream-weights"
FORMAT_VERSION = "1"
_SHOW = 8  # keys listed per kind in a mismatch error


def default_factory() -> ModelFactory:
    """``EchoStreamModel`` (imported lazily: it composes every sub-model)."""
    try:
        from .echostream_model import EchoStreamModel
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.echostream_model":
            raise
        raise ImportError(
            "models/echostream_model.py (EchoStreamModel) is not available; pass factory=..."
        ) from None
    return EchoStreamModel


def build_model(cfg: EchoStreamConfig, factory: ModelFactory | None = None) -> nn.Module:
    """Build ``factory(cfg)`` with its parameters drawn from ``torch.manual_seed(cfg.seed)``.

    Same config and seed give bitwise identical weights in any process; the caller's global RNG
    state is left untouched (forked and restored). Returned in eval mode (the inference reference).
    """
    factory = factory or default_factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = factory(cfg)
    return model.eval()


def _paths(path: str | os.PathLike, name: str = DEFAULT_NAME) -> tuple[Path, Path]:
    """``dir`` -> (``dir/<name>.safetensors``, ``dir/config.json``); ``x.safetensors`` ->
    (itself, ``config.json`` beside it)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.parent / CONFIG_FILE
    return path / f"{name}.safetensors", path / CONFIG_FILE


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store tensors that are the same memory (tied weights) once: -> (tensors, alias -> key).

    safetensors refuses shared memory, and a tied table stored twice would double the file.
    Stored tensors are contiguous copies, so no two of them share memory either."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def save_checkpoint(model: nn.Module, cfg: EchoStreamConfig, path: str | os.PathLike,
                    name: str = DEFAULT_NAME) -> Path:
    """Write ``model.state_dict()`` as safetensors and ``cfg`` as ``config.json``.

    Args:
        path: a folder (created; gets ``<name>.safetensors`` + ``config.json``) or a
            ``*.safetensors`` file path (``config.json`` goes beside it).
    Returns:
        the weights file path.
    """
    weights_path, config_path = _paths(path, name)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(model.state_dict())
    metadata = {
        "format": "pt",
        "echostream_format": FORMAT,
        "echostream_format_version": FORMAT_VERSION,
        "config_name": cfg.name,
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    # Write-then-rename: an interrupted save never leaves a truncated file under the real name.
    with atomic_file(weights_path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    cfg.save(config_path)
    return weights_path


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a weights file, aliases expanded (key -> tensor, as ``state_dict()``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read weights file {path}: {exc}") from None
    if metadata.get("echostream_format", FORMAT) != FORMAT or \
            metadata.get("echostream_format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: weights format expected {FORMAT} v{FORMAT_VERSION}, got "
            f"{metadata.get('echostream_format')} v{metadata.get('echostream_format_version')}"
        )
    for alias, key in json.loads(metadata.get("aliases", "{}")).items():
        if key not in tensors:
            raise ValueError(f"{path}: alias {alias!r} points to missing tensor {key!r}")
        tensors[alias] = tensors[key]
    return tensors


def _listing(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")
    return f"{len(keys)} {kind}: {shown}"


def check_weights(model: nn.Module, tensors: dict[str, Tensor], source: str = "weights") -> None:
    """Raise ``ValueError`` listing missing, unexpected and shape/dtype-mismatched keys of
    ``tensors`` against ``model.state_dict()``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        f"{key} (expected {list(expected[key].shape)} {expected[key].dtype}, "
        f"got {list(tensors[key].shape)} {tensors[key].dtype})"
        for key in set(expected) & set(tensors)
        if expected[key].shape != tensors[key].shape or expected[key].dtype != tensors[key].dtype
    )
    problems = [_listing(kind, keys) for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if keys]
    if problems:
        raise ValueError(f"{source} do not fit the model built from the config: " + "; ".join(problems))


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model`` in place (checked, bitwise); returns ``model``."""
    tensors = read_weights(path)
    check_weights(model, tensors, source=f"weights in {path}")
    model.load_state_dict(tensors, strict=True)
    return model


def load_checkpoint(path: str | os.PathLike,
                    factory: ModelFactory | None = None) -> tuple[nn.Module, EchoStreamConfig]:
    """Rebuild the model from ``config.json`` and load its weights -> ``(model in eval mode, cfg)``.

    Args:
        path: a checkpoint folder (``weights.safetensors``, or its only ``*.safetensors``) or a
            ``*.safetensors`` file with ``config.json`` beside it.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path}")
    weights_path, config_path = _paths(path)
    if path.is_dir() and not weights_path.is_file():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(
                f"checkpoint {path}: expected {weights_path.name} or exactly one *.safetensors, "
                f"got {[p.name for p in found]}"
            )
        weights_path = found[0]
    if not config_path.is_file():
        raise ValueError(f"checkpoint config not found: {config_path}")
    try:
        cfg = EchoStreamConfig.load(config_path)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad checkpoint config {config_path}: {exc}") from None
    # Copy into a built model rather than assigning tensors: assignment would untie tied weights.
    model = build_model(cfg, factory)
    load_weights(model, weights_path)
    return model.eval(), cfg
