"""Export one stage of an :class:`EchoStreamModel` to a verified, self-describing ONNX graph.

Recipe (reference/tensorrt-onnx-deployment.md §5, emformer-streaming-onnx.md §7):

1. wrap ``model.stage_step(stage)`` in a positional module whose arguments and results follow the
   contract's order (``x``, context, states -> data outputs, ``next_<state>``);
2. ``torch.onnx.export(dynamo=True, opset_version=18, external_data=False)`` with the contract's
   names and one dynamic axis: batch (axis 0 of every input, ``Dim("B", min=1)``), traced from a
   batch of 2 with *random* caches and non-zero counters (so nothing specialises on zeros/ones);
3. verify: ``onnx.checker`` (full check), strict shape inference, graph I/O names/dtypes/shapes ==
   the contract, and no symbolic dimension anywhere except the batch;
4. stamp ``metadata_props`` with the config (JSON) and its key streaming fields.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from echostream.contract import (BATCH, INT32, StageContract, conformer_conv_chunk,
                                 integer_range)
from echostream.errors import ArtifactError, EchoStreamError
from echostream.models.state import random_state, torch_dtype
from echostream.runtime.artifacts import check_graph_io

OPSET = 18
EXAMPLE_BATCH = 2
EXPORTER = "torch.onnx.export(dynamo=True)"


class ExportError(EchoStreamError):
    """A stage could not be exported or its graph failed verification."""


class StageModule(nn.Module):
    """``model.stage_step(stage)`` as ``forward(*inputs) -> tuple(outputs)`` in contract order."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self.model = model
        self.contract: StageContract = model.contract(stage)
        self._step = model.stage_step(stage)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        c = self.contract
        feed = dict(zip(c.input_names, tensors))
        inputs = {t.name: feed[t.name] for t in c.data_inputs + c.context}
        state = {name: feed[name] for name in c.state_names}
        outputs, next_state = self._step(inputs, state)
        return tuple(outputs[t.name] for t in c.data_outputs) + tuple(
            next_state[name] for name in c.state_names
        )


# ---- example / random feeds (shared with the parity suite) ---------------------------------------


def random_data(contract: StageContract, cfg: dict[str, Any], batch: int,
                generator: torch.Generator) -> dict[str, Tensor]:
    """Random data inputs: N(0, 1) floats, in-range integers."""
    out = {}
    for spec in contract.data_inputs:
        shape = spec.concrete_shape(batch)
        if spec.dtype == INT32:
            low, high = integer_range(contract.stage, cfg, spec.name)
            out[spec.name] = torch.randint(low, high, shape, generator=generator, dtype=torch.int32)
        else:
            out[spec.name] = torch.randn(shape, generator=generator, dtype=torch_dtype(spec))
    return out


def random_context(contract: StageContract, batch: int, generator: torch.Generator,
                   max_counter: int = 50) -> dict[str, Tensor]:
    """Random context (another stage's state); counters >= 1 (the MT decoder needs >= 1 frame)."""
    out = {}
    for spec in contract.context:
        shape = spec.concrete_shape(batch)
        if spec.dtype == INT32:
            out[spec.name] = torch.randint(1, max_counter, shape, generator=generator, dtype=torch.int32)
        else:
            out[spec.name] = torch.randn(shape, generator=generator)
    return out


def example_inputs(contract: StageContract, cfg: dict[str, Any], batch: int = EXAMPLE_BATCH,
                   seed: int = 0) -> tuple[Tensor, ...]:
    """Positional example inputs in contract order: random data, context and state, counters >= 1."""
    g = torch.Generator().manual_seed(seed)
    feed = random_data(contract, cfg, batch, g)
    feed.update(random_context(contract, batch, g))
    state = random_state(contract, batch, g)
    feed.update({k: v + 1 if v.dtype == torch.int32 else v for k, v in state.items()})
    return tuple(feed[name] for name in contract.input_names)


# ---- export ------------------------------------------------------------------------------------


@dataclass
class StageExport:
    """What exporting one stage produced."""

    stage: str
    path: Path
    seconds: float
    nodes: int
    bytes: int
    op_types: dict[str, int] = field(default_factory=dict)


def export_stage(model: nn.Module, stage: str, path: str | Path, *, opset: int = OPSET,
                 batch: int = EXAMPLE_BATCH, seed: int = 0) -> StageExport:
    """Export, verify and stamp one stage graph at ``path`` (single file, weights inside).

    Raises:
        ExportError naming the stage and the cause.
    """
    path = Path(path)
    model.eval()
    wrapper = StageModule(model, stage).eval()
    contract, cfg = wrapper.contract, model.cfg.to_dict()
    args = example_inputs(contract, cfg, batch, seed)
    batch_dim = torch.export.Dim(BATCH, min=1)
    start = time.perf_counter()
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, external_data=False,
                input_names=contract.input_names, output_names=contract.output_names,
                dynamic_shapes=(tuple({0: batch_dim} for _ in args),), verbose=False,
            )
    except Exception as exc:  # torch.export / onnxscript raise many types; keep the first line
        raise ExportError(f"{stage}: torch.onnx.export failed: {_first_line(exc)}") from exc
    proto = program.model_proto
    verify_graph(proto, contract, where=f"{stage} graph")
    stamp_metadata(proto, stage, cfg, opset)
    onnx.save_model(proto, str(path))
    seconds = time.perf_counter() - start
    ops = Counter(node.op_type for node in proto.graph.node)
    return StageExport(stage, path, seconds, len(proto.graph.node), path.stat().st_size, dict(ops))


def verify_graph(proto: onnx.ModelProto, contract: StageContract, where: str) -> None:
    """Checker, strict shape inference, I/O == contract, only the batch dim symbolic.

    Raises:
        ExportError naming the stage, the tensor and expected vs got.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{where}: ONNX check failed: {_first_line(exc)}") from exc
    graph = inferred.graph
    try:
        check_graph_io(where, contract, map(_value_io, graph.input), map(_value_io, graph.output))
    except ArtifactError as exc:
        raise ExportError(str(exc)) from None
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param != BATCH:
                raise ExportError(
                    f"{where}: tensor {value.name!r} has symbolic dim {dim.dim_param!r}; "
                    f"expected only the batch dim {BATCH!r} (a data-dependent shape leaked in)"
                )


def stamp_metadata(proto: onnx.ModelProto, stage: str, cfg: dict[str, Any], opset: int) -> None:
    """Mirror the key config in ``metadata_props`` (a graph must describe itself without the
    manifest; TensorRT plans get the same fields from the manifest)."""
    enc = cfg["encoder"]
    props = {
        "model_type": "echostream",
        "stage": stage,
        "preset": cfg.get("name", ""),
        "opset": opset,
        "encoder_kind": enc["kind"],
        "segment_length": enc["segment_length"],
        "right_context": enc["right_context"],
        "left_context": enc["left_context"],
        "memory_size": enc["memory_size"],
        "num_layers": enc["num_layers"],
        "d_model": enc["d_model"],
        "num_heads": enc["num_heads"],
        "tanh_on_mem": enc["tanh_on_mem"],
        "counter_dtype": INT32,
        "state_layout": "batch-first, right-aligned fixed-capacity FIFOs, validity from int32 counters",
        "config": json.dumps(cfg, sort_keys=True),
    }
    if enc["kind"] == "conformer":  # the chunk the graph serves (segment_ms = 40 C) and its convs'
        props.update(chunk_size=enc["chunk_size"], conv_chunk_size=conformer_conv_chunk(enc["chunk_size"]))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)


def _value_io(value: onnx.ValueInfoProto) -> tuple[str, str, list]:
    t = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in t.shape.dim]
    return value.name, dtype, dims


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines, warnings and torchvision notices; keep the CLI clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
