"""Load a ``torchaudio.models.Emformer`` state dict into EchoStream's Emformer layers.

Only the Emformer stack is mapped (torchaudio has no subsampling of its own); torchaudio need not
be installed, a plain state dict is enough. Key mapping, per layer ``i``
(``P`` = whatever prefix precedes ``emformer_layers.``, e.g. ``""`` for a bare ``Emformer`` or
``"transcriber.transformer."`` for an Emformer RNN-T; keys outside ``P emformer_layers.`` are
ignored):

================================================  ===================================================
torchaudio ``P emformer_layers.{i}.``             ``EmformerLayer`` (``layers[i].``)
================================================  ===================================================
``attention.emb_to_query.{weight,bias}``          ``attention.q_proj.{weight,bias}``
``attention.emb_to_key_value.{weight,bias}``      rows ``[:D]`` -> ``attention.k_proj``,
                                                  rows ``[D:]`` -> ``attention.v_proj``
                                                  (torchaudio chunks its fused output key-first)
``attention.out_proj.{weight,bias}``              ``attention.out_proj.{weight,bias}``
``layer_norm_input.*``, ``layer_norm_output.*``   same names
``pos_ff.{0,1,4}.*`` (LN, Linear, Linear)         same names (same Sequential layout)
================================================  ===================================================

The math needs no conversion: torchaudio scales queries by ``(D/H)^-0.5`` before the dot product,
:class:`~echostream.models.attention.MultiheadAttention` scales the scores by the same factor.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .emformer_layer import EmformerLayer

LAYERS_KEY = "emformer_layers."
_FUSED_KV = "attention.emb_to_key_value."
_RENAMED = {"attention.emb_to_query.": "attention.q_proj."}


def _layer_list(encoder_or_layers: nn.Module | Iterable[EmformerLayer]) -> list[EmformerLayer]:
    layers = getattr(encoder_or_layers, "layers", encoder_or_layers)
    layers = list(layers)
    if not layers or not all(isinstance(layer, EmformerLayer) for layer in layers):
        raise ValueError("expected an EchoStreamEncoder or a non-empty sequence of EmformerLayer, "
                         f"got {type(encoder_or_layers).__name__}")
    return layers


def _split_by_layer(state_dict: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """``{layer index: {key inside the layer: tensor}}`` for every ``P emformer_layers.{i}.`` key."""
    prefixes = {k[: k.index(LAYERS_KEY)] for k in state_dict if LAYERS_KEY in k}
    if len(prefixes) != 1:
        raise ValueError(f"expected the keys of one torchaudio Emformer ('<prefix>{LAYERS_KEY}<i>.'),"
                         f" got prefixes {sorted(prefixes)}")
    prefix = prefixes.pop() + LAYERS_KEY
    by_layer: dict[int, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            by_layer.setdefault(int(index), {})[rest] = value
    return by_layer


def convert_layer_state(ta_layer: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One torchaudio ``_EmformerLayer`` state dict -> one :class:`EmformerLayer` state dict."""
    out: dict[str, Tensor] = {}
    for key, value in ta_layer.items():
        if key.startswith(_FUSED_KV):
            k, v = value.chunk(2, dim=0)
            name = key[len(_FUSED_KV):]
            out[f"attention.k_proj.{name}"], out[f"attention.v_proj.{name}"] = k, v
            continue
        for old, new in _RENAMED.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def torchaudio_layer_keys(layer: EmformerLayer) -> set[str]:
    """The keys a torchaudio ``_EmformerLayer`` with ``layer``'s structure has (inverse mapping)."""
    keys = set()
    for key in layer.state_dict():
        for ours in ("attention.k_proj.", "attention.v_proj."):
            if key.startswith(ours):
                key = _FUSED_KV + key[len(ours):]
        for old, new in _RENAMED.items():
            if key.startswith(new):
                key = old + key[len(new):]
        keys.add(key)
    return keys


def load_torchaudio_emformer(encoder_or_layers: nn.Module | Iterable[EmformerLayer],
                             state_dict: Mapping[str, Tensor]) -> None:
    """Copy a torchaudio Emformer's weights into ``encoder_or_layers`` (in place).

    Args:
        encoder_or_layers: an ``EchoStreamEncoder`` (its ``layers``) or a sequence of
            :class:`EmformerLayer`; the subsampling front end is left untouched.
        state_dict: ``torchaudio.models.Emformer(...).state_dict()`` or a larger model's state dict
            containing one (see the module docstring for the key mapping).
    Raises:
        ValueError: layer count, key set or a tensor shape does not match (expected vs got).
    """
    layers = _layer_list(encoder_or_layers)
    by_layer = _split_by_layer(state_dict)
    if sorted(by_layer) != list(range(len(layers))):
        raise ValueError(f"layer count expected {len(layers)}, got torchaudio layers {sorted(by_layer)}")
    for index, layer in enumerate(layers):
        want, got = torchaudio_layer_keys(layer), set(by_layer[index])
        if want != got:
            raise ValueError(f"layer {index}: torchaudio keys expected {sorted(want)}, got "
                             f"{sorted(got)} (missing {sorted(want - got)}, unexpected {sorted(got - want)})")
        converted = convert_layer_state(by_layer[index])
        own = layer.state_dict()
        for key, value in converted.items():
            if value.shape != own[key].shape:
                raise ValueError(f"layer {index}: {key} shape expected {list(own[key].shape)}, "
                                 f"got {list(value.shape)}")
        with torch.no_grad():
            layer.load_state_dict(converted, strict=True)
