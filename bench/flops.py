"""FLOPs of one call of an ONNX stage graph, counted from the graph itself.

Only the ops that carry the arithmetic are counted -- ``MatMul``, ``Gemm``, ``Conv``,
``ConvTranspose`` -- at 2 FLOPs per multiply-accumulate, with every shape taken from ONNX shape
inference after the batch axis is fixed to 1. Element-wise ops, softmax, normalisation and the like
are left out on purpose: they are a few percent of the arithmetic here and memory-bound anyway, so
counting them would flatter the achieved-FLOP/s figure rather than inform it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

COUNTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass
class GraphFlops:
    """FLOPs of one call of a graph (batch 1).

    ``by_op``: FLOPs per op type; ``nodes``: how many nodes of each counted type; ``weight_bytes``:
    bytes of every initializer (the weights the runtime must hold for this graph).
    """

    path: str
    flops: int
    by_op: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0

    def to_dict(self) -> dict:
        return {"path": self.path, "flops": self.flops, "by_op": self.by_op, "nodes": self.nodes,
                "weight_bytes": self.weight_bytes}


def count_graph_flops(path: str | Path, batch: int = 1) -> GraphFlops:
    """Count the FLOPs of one call of the graph at ``path`` with every batch axis set to ``batch``.

    Raises:
        ValueError naming the node whose operand shapes shape inference could not resolve.
    """
    model = onnx.load(str(path))
    _fix_batch(model.graph, batch)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    shapes = _known_shapes(model.graph)
    by_op: Counter[str] = Counter()
    nodes: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        by_op[node.op_type] += node_flops(node, shapes)
        nodes[node.op_type] += 1
    weight_bytes = sum(_initializer_bytes(t) for t in model.graph.initializer)
    return GraphFlops(str(path), int(sum(by_op.values())), dict(by_op), dict(nodes), weight_bytes)


def node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """2 x multiply-accumulates of one MatMul / Gemm / Conv / ConvTranspose node."""
    def shape(i: int) -> tuple[int, ...]:
        name = node.input[i]
        if name not in shapes:
            raise ValueError(f"{node.op_type} node {node.name!r}: shape of input {name!r} is unknown "
                             "after shape inference")
        return shapes[name]

    if node.op_type == "MatMul":
        return 2 * matmul_macs(shape(0), shape(1))
    if node.op_type == "Gemm":
        a, b = shape(0), shape(1)
        attrs = {a_.name: a_.i for a_ in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else a
        n = b[0] if attrs.get("transB", 0) else b[1]
        return 2 * m * k * n
    out_name = node.output[0]
    if out_name not in shapes:
        raise ValueError(f"{node.op_type} node {node.name!r}: output shape unknown after inference")
    weight = shape(1)  # its dim 1 is already per group (Cin/g, or Cout/g for ConvTranspose)
    kernel = math.prod(weight[2:])
    if node.op_type == "Conv":
        # out [N, Cout, *spatial]; weight [Cout, Cin/g, *k]: every output reads Cin/g * k inputs.
        return 2 * math.prod(shapes[out_name]) * weight[1] * kernel
    # ConvTranspose: input [N, Cin, *spatial]; weight [Cin, Cout/g, *k]: every input scatters to
    # Cout/g * k outputs.
    return 2 * math.prod(shape(0)) * weight[1] * kernel


def matmul_macs(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Multiply-accumulates of ``numpy.matmul`` semantics (1-D operands promoted, batch broadcast).

    ``a`` ``[..., M, K]`` x ``b`` ``[..., K, N]`` -> ``prod(broadcast batch) * M * K * N``.
    """
    a2 = (1,) + tuple(a) if len(a) == 1 else tuple(a)
    b2 = tuple(b) + (1,) if len(b) == 1 else tuple(b)
    if a2[-1] != b2[-2]:
        raise ValueError(f"MatMul shapes do not contract: {list(a)} x {list(b)}")
    batch_a, batch_b = a2[:-2], b2[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = (1,) * (width - len(batch_a)) + batch_a
    batch_b = (1,) * (width - len(batch_b)) + batch_b
    batch = math.prod(max(x, y) for x, y in zip(batch_a, batch_b))
    return batch * a2[-2] * a2[-1] * b2[-1]


def _fix_batch(graph: onnx.GraphProto, batch: int) -> None:
    """Replace every symbolic dim of the graph inputs and outputs by ``batch`` (the contract
    allows only the batch axis to be symbolic)."""
    for value in (*graph.input, *graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_value = batch


def _known_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Every fully static tensor shape the graph knows: inputs, outputs, value_info, initializers
    and ``Constant`` outputs."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return shapes


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of one initializer from its dims and element type (works for external data too)."""
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(int(d) for d in tensor.dims) * itemsize
