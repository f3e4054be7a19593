"""A released unit HiFi-GAN (fairseq ``CodeGenerator``) -> ``models/decoders/vocoder.py`` weights.

The vocoder checkpoint is ``{"generator": state_dict}`` with every generator conv (``conv_pre``,
``ups.*``, ``resblocks.*.convs{1,2}.*``, ``conv_post``) under weight norm: ``<conv>.weight_g``
``[out, 1, 1]`` and ``<conv>.weight_v`` (or the parametrization form
``<conv>.parametrizations.weight.original0/1``). fairseq removes weight norm at load; so do we,
exactly as ``torch.nn.utils.remove_weight_norm``: ``w = g * v / ||v||``, the norm over every dim
but 0 (``torch._weight_norm(v, g, 0)``). Plain ``<conv>.weight`` keys are taken as they are. Key
names are otherwise ours (``dict``, ``dur_predictor.*`` ...). Its ``config.json`` (fairseq's names)
gives :class:`VocoderConfig`; the streaming windows keep the preset defaults.

Examples:
    >>> vcfg = read_vocoder_config("config.json", VocoderConfig())         # doctest: +SKIP
    >>> plan = plan_vocoder(generator_state, expected_shapes, "g_00500000")  # doctest: +SKIP
    >>> weights = materialise_vocoder(plan, reader)                          # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from echostream.export.fairseq_checkpoint import CheckpointError, TensorRef, TorchZipReader
from echostream.config import VocoderConfig

PREFIX = "vocoder."
_WN_FORMS = (("weight_g", "weight_v"),
             ("parametrizations.weight.original0", "parametrizations.weight.original1"))


# ---- config.json -----------------------------------------------------------------------------------


def _int_list(value: Any, depth: int = 1) -> bool:
    if depth == 0:
        return type(value) is int and value > 0
    return isinstance(value, list) and bool(value) and all(_int_list(v, depth - 1) for v in value)


def _field(cfg: dict[str, Any], name: str, depth: int, path: Path) -> Any:
    if name not in cfg:
        raise CheckpointError(f"{path}: field {name} expected, got none")
    value = cfg[name]
    if not _int_list(value, depth):
        kind = ["a positive int", "a list of positive ints", "a list of lists of positive ints"][depth]
        raise CheckpointError(f"{path}: field {name} expected {kind}, got {value!r}")
    return value


def _expect(path: Path, name: str, want: Any, got: Any, why: str) -> None:
    if got != want:
        raise CheckpointError(f"{path}: field {name} expected {want!r} ({why}), got {got!r}")


def _duration_fields(cfg: dict[str, Any], embedding_dim: int, path: Path) -> dict[str, int]:
    params = cfg.get("dur_predictor_params")
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: field dur_predictor_params expected (a duration "
                              f"predictor), got {params!r}")
    hidden = _field(params, "var_pred_hidden_dim", 0, path)
    kernel = _field(params, "var_pred_kernel_size", 0, path)
    # fairseq's VariancePredictor pads its second conv by 1 whatever the kernel: only 3 keeps lengths.
    _expect(path, "dur_predictor_params.var_pred_kernel_size", 3, kernel,
            "fairseq pads the second conv by 1")
    _expect(path, "dur_predictor_params.encoder_embed_dim", embedding_dim,
            params.get("encoder_embed_dim"), "= embedding_dim")
    return {"duration_hidden": hidden, "duration_kernel": kernel}


def read_vocoder_config(path: str | Path, base: VocoderConfig) -> VocoderConfig:
    """fairseq's vocoder ``config.json`` -> ``base`` with the generator's dims replaced.

    Refused (field, expected, got): a missing or mistyped dim, f0 or speaker inputs, an input
    width (``model_in_dim``) other than ``embedding_dim``, no duration predictor.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the vocoder config ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    dims = {
        "upsample_rates": _field(cfg, "upsample_rates", 1, path),
        "upsample_kernel_sizes": _field(cfg, "upsample_kernel_sizes", 1, path),
        "upsample_initial_channel": _field(cfg, "upsample_initial_channel", 0, path),
        "resblock_kernel_sizes": _field(cfg, "resblock_kernel_sizes", 1, path),
        "resblock_dilation_sizes": _field(cfg, "resblock_dilation_sizes", 2, path),
        "num_units": _field(cfg, "num_embeddings", 0, path),
        "embedding_dim": _field(cfg, "embedding_dim", 0, path),
    }
    for name in ("f0", "multispkr", "embedder_params"):
        _expect(path, name, None, cfg.get(name) or None, "a unit-only vocoder")
    # fairseq's Generator defaults model_in_dim to 80 (mel input): a unit vocoder sets it.
    _expect(path, "model_in_dim", dims["embedding_dim"], cfg.get("model_in_dim", 80),
            "= embedding_dim, units only")
    dims.update(_duration_fields(cfg, dims["embedding_dim"], path))
    try:
        return dataclasses.replace(base, **dims)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


# ---- weights ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocoderTensor:
    """How one EchoStream vocoder tensor is made: ``weight`` (taken as is) or ``g``/``v``.

    Examples:
        >>> entry = VocoderTensor("conv_pre.weight", g=g_ref, v=v_ref)   # doctest: +SKIP
        >>> materialise_vocoder([entry], reader)["vocoder.conv_pre.weight"].shape   # doctest: +SKIP
        torch.Size([512, 128, 7])
    """

    key: str
    weight: TensorRef | None = None
    g: TensorRef | None = None
    v: TensorRef | None = None


def _shape(shape) -> list[int]:
    return list(shape)


def _weight_source(state: dict[str, TensorRef], name: str) -> tuple[VocoderTensor, set[str]]:
    """The source of ``<name>.weight``: plain or weight-normed -> (plan entry, keys used)."""
    for g_key, v_key in _WN_FORMS:
        g, v = f"{name}.{g_key}", f"{name}.{v_key}"
        if g in state and v in state:
            return VocoderTensor(f"{name}.weight", g=state[g], v=state[v]), {g, v}
    key = f"{name}.weight"
    return VocoderTensor(key, weight=state.get(key)), {key}


def _check_entry(entry: VocoderTensor, want: tuple[int, ...], source: str) -> None:
    if entry.weight is None and entry.v is None:
        raise CheckpointError(f"{source}: generator key {entry.key} (or its weight_g/weight_v) "
                              f"is missing (expected shape {_shape(want)})")
    main = entry.weight or entry.v
    if tuple(main.shape) != tuple(want):
        name = entry.key if entry.weight else entry.key + "_v"
        raise CheckpointError(f"{source}: generator key {name}: shape expected {_shape(want)}, "
                              f"got {_shape(main.shape)}")
    if entry.g is not None:
        g_want = (want[0],) + (1,) * (len(want) - 1)
        if tuple(entry.g.shape) != g_want:
            raise CheckpointError(f"{source}: generator key {entry.key}_g: shape expected "
                                  f"{_shape(g_want)}, got {_shape(entry.g.shape)}")


def _layer_count(state: dict[str, TensorRef], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return len(found)


def check_vocoder_dims(state: dict[str, TensorRef], vcfg: VocoderConfig, source: str,
                       config: str) -> None:
    """The config's dims against the weights, field by field (before the per-key check)."""
    def shape(key: str, dim: int):
        for k in (f"{key}.weight", f"{key}.weight_v", f"{key}.parametrizations.weight.original1"):
            if k in state:
                return state[k].shape[dim], k
        return None, None

    # (field, the config's value, the weights' value, where in the weights)
    checks = [("num_embeddings", vcfg.num_units, *shape("dict", 0)),
              ("embedding_dim", vcfg.embedding_dim, *shape("dict", 1)),
              ("upsample_initial_channel", vcfg.upsample_initial_channel, *shape("conv_pre", 0)),
              ("var_pred_hidden_dim", vcfg.duration_hidden, *shape("dur_predictor.conv1.0", 0))]
    checks.append(("len(upsample_rates)", len(vcfg.upsample_rates), _layer_count(state, "ups."), "ups.*"))
    blocks = len(vcfg.upsample_rates) * len(vcfg.resblock_kernel_sizes)
    checks.append(("len(upsample_rates) x len(resblock_kernel_sizes)", blocks,
                   _layer_count(state, "resblocks."), "resblocks.*"))
    for name, in_config, in_weights, where in checks:
        if in_weights is not None and in_weights != in_config:
            raise CheckpointError(f"{config}: field {name} expected {in_weights} (weights {source}: "
                                  f"{where}), got {in_config}")


def plan_vocoder(state: dict[str, TensorRef], expected: dict[str, tuple[int, ...]],
                 source: str) -> list[VocoderTensor]:
    """Every EchoStream vocoder tensor (``expected``: key without ``vocoder.`` -> shape) with its
    source; strict: a missing, misshaped or left-over generator key is an error naming it."""
    plan, used = [], set()
    for key, want in expected.items():
        if key.endswith(".weight"):
            entry, keys = _weight_source(state, key[: -len(".weight")])
        else:
            entry, keys = VocoderTensor(key, weight=state.get(key)), {key}
        _check_entry(entry, want, source)
        plan.append(entry)
        used |= keys
    extra = sorted(set(state) - used)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: unexpected generator key {extra[0]}{more}: not a tensor "
                              "of the unit HiFi-GAN this config builds")
    return plan


def materialise_vocoder(plan: list[VocoderTensor], reader: TorchZipReader) -> dict[str, torch.Tensor]:
    """-> ``vocoder.<key>`` fp32 tensors, weight norm removed (``g * v / ||v||``, norm over dims 1..)."""
    out = {}
    for entry in plan:
        if entry.g is not None:
            v = reader.tensor(entry.v).float()
            g = reader.tensor(entry.g).float()
            value = torch._weight_norm(v, g, 0)
        else:
            value = reader.tensor(entry.weight)
            if not value.is_floating_point():
                raise CheckpointError(f"{reader.path}: generator key {entry.key}: dtype expected "
                                      f"floating point, got {value.dtype}")
            value = value.float()
        out[PREFIX + entry.key] = value
    return out
