"""fp16 variants of exported stage graphs (TensorRT 11 takes precision from the graph, not flags).

TensorRT 11 removed weak typing (``BuilderFlag.FP16``): a strongly typed network runs each layer in
the type the ONNX graph gives it. So the fp16 engine is built from an fp16 *graph*: weights and most
compute in fp16, with fp32 islands where fp16 loses accuracy, and an unchanged I/O contract:

- kept fp32: attention softmax together with the score MatMul, scaling and mask Add feeding it
  (scores of long contexts overflow or lose the small differences softmax amplifies; the mask fill
  must stay exact), LayerNormalization (variance of 512-d rows), LogSoftmax (CTC / next-token
  log-probs are compared by argmax and summed over time), sinusoidal position angles (Sin/Cos and
  the ``position * frequency`` arithmetic feeding them: fp16 cannot resolve large angles);
- every graph input and output stays fp32 (states included), with Casts at the boundaries, so the
  runtime, the contract and the manifest do not change with precision.

The rewrite is done here, node by node, rather than with onnxconverter-common's or ONNX Runtime's
float16 converters: with block lists and ``keep_io_types`` both leave lossy fp32->fp16->fp32 Cast
pairs between neighbouring fp32 nodes (and around fp32 graph outputs), which a strongly typed
TensorRT network must execute as written; onnxconverter-common 1.16 also leaves ``Cast(to=float)``
unconverted and emits invalid graphs when a state output is read again inside the graph. The result
is verified: onnx checker (strict type inference), unchanged I/O, one ONNX Runtime CPU step with
finite outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from echostream.contract import StageContract
from echostream.errors import ArtifactError

DEFAULT_KEEP_FP32_OPS = ("Softmax", "LogSoftmax", "LayerNormalization", "Sin", "Cos")
# Sinks whose inputs are computed in fp32 too: op -> (ops walked through, ops kept but not passed).
_SCORE_PATH = ({"Add", "Sub", "Mul", "Div", "Where", "Neg"}, {"MatMul"})
_ANGLE_PATH = ({"Add", "Sub", "Mul", "Div", "Neg", "Unsqueeze", "Reshape", "Expand", "Transpose",
                "Concat"}, {"Cast"})
_ISLANDS = {"Softmax": _SCORE_PATH, "Sin": _ANGLE_PATH, "Cos": _ANGLE_PATH}
_FLOAT, _FLOAT16 = 1, 10
_FP16_MAX = 65504.0


def fp16_path(onnx_path: str | Path) -> Path:
    """Where the fp16 variant of ``<stage>.onnx`` lives: ``<stage>.fp16.onnx`` beside it."""
    p = Path(onnx_path)
    return p.with_name(p.name.split(".", 1)[0] + ".fp16.onnx")


def fp32_island_nodes(graph, keep_fp32_ops: Iterable[str]) -> list[str]:
    """Names of the nodes that must run in fp32 because of what they feed.

    - Softmax: walks back through the scale / mask / bias elementwise ops to (and including) the
      attention score MatMul. Nodes on other paths (the mask built from counters) stay fp16:
      their values (0 and the finite fill) are exact in fp16.
    - Sin / Cos: walks back through the angle arithmetic (``position * frequency``) to the Cast
      from the integer position: in fp16 an angle near 200 rad is off by up to 0.06 rad.
    Only sinks whose op type is in ``keep_fp32_ops`` are followed.
    """
    producer = {out: node for node in graph.node for out in node.output}
    picked: dict[int, str] = {}
    stack = [(producer[n.input[0]], _ISLANDS[n.op_type]) for n in graph.node
             if n.op_type in _ISLANDS and n.op_type in keep_fp32_ops and n.input[0] in producer]
    while stack:
        node, (through, terminal) = stack.pop()
        if id(node) in picked or not (node.op_type in through or node.op_type in terminal):
            continue
        picked[id(node)] = node.name
        if node.op_type in through:
            stack.extend((producer[i], (through, terminal)) for i in node.input if i in producer)
    unnamed = [n for n in picked.values() if not n]
    if unnamed:
        raise ValueError(f"{len(unnamed)} fp32-island node(s) have no name; name every node first")
    return sorted(picked.values())


def _name_nodes(graph) -> None:
    """Give unnamed nodes unique names (the block list addresses nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_fp16_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _io_signature(graph) -> list[tuple[str, int, tuple]]:
    def sig(vi):
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        return vi.name, t.elem_type, dims

    return [sig(v) for v in graph.input] + [("->", 0, ())] + [sig(v) for v in graph.output]


def convert_to_fp16(model, keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS):
    """The fp16 rewrite of an in-memory ONNX model (returns a new ModelProto; I/O unchanged).

    Every node runs in fp16 unless its op type is in ``keep_fp32_ops``, it feeds a kept Softmax /
    Sin / Cos (:func:`fp32_island_nodes`), or its schema has no fp16 kernel for a float operand
    (e.g. Range). fp32 nodes read fp32 initializers directly (exact LayerNorm weights);
    a Cast is inserted on every edge that crosses precisions, once per tensor and direction.

    Args:
        model: an fp32 ``onnx.ModelProto`` without subgraphs (stage graphs have none: DESIGN §4).
        keep_fp32_ops: op types computed in fp32.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    if any(a.HasField("g") or len(a.graphs) for n in graph.node for a in n.attribute):
        raise ValueError("fp16 rewrite: graphs with subgraphs (If/Loop/Scan) are not supported")
    _name_nodes(graph)
    fp32_nodes = set(keep_fp32_ops)
    island = set(fp32_island_nodes(graph, fp32_nodes))
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    rewrite = _Rewrite(graph)
    for node in list(graph.node):
        keep = node.op_type in fp32_nodes or node.name in island or \
            not _fp16_capable(node, rewrite.original, opset)
        rewrite.emit(node, _FLOAT if keep else _FLOAT16)
    rewrite.finish()
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _formal(params, index: int):
    """The schema parameter an actual input/output position binds to (variadic-aware)."""
    from onnx import defs

    if index < len(params):
        return params[index]
    if params and params[-1].option == defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _fp16_capable(node, types: dict[str, int], opset: int) -> bool:
    """True when every float operand of ``node`` may be float16 according to its ONNX schema."""
    from onnx import defs

    try:
        schema = defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # noqa: BLE001 - unknown op: leave it in fp32
        return False
    allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
    for params, names in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, name in enumerate(names):
            formal = _formal(params, i)
            if not name or formal is None or types.get(name) != _FLOAT:
                continue
            if "tensor(float16)" not in allowed.get(formal.type_str, {formal.type_str}):
                return False
    return True


class _Rewrite:
    """Re-emits a graph's nodes one by one, each in a chosen float precision, inserting Casts."""

    def __init__(self, graph):
        self.graph = graph
        self.original = {v.name: v.type.tensor_type.elem_type
                         for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
        self.inits = {t.name: t for t in graph.initializer}
        self.original.update({n: t.data_type for n, t in self.inits.items()})
        self.current = {n: t for n, t in self.original.items() if n not in self.inits}
        self.outputs = {v.name for v in graph.output}
        self.casts: dict[tuple[str, int], str] = {}  # (tensor, precision) -> converted name
        self.produced: dict[str, str] = {}  # graph output -> the inner fp16 tensor holding it
        self.nodes: list = []
        self.used_inits: set[str] = set()

    def emit(self, node, precision: int) -> None:
        for i, name in enumerate(node.input):
            if name and self.original.get(name) == _FLOAT:
                node.input[i] = self._as(name, precision)
        if precision == _FLOAT16:
            _retarget_to_fp16(node)
        for i, name in enumerate(node.output):
            if self.original.get(name) != _FLOAT:
                continue
            self.current[name] = _output_type(node, precision)
            if name in self.outputs and self.current[name] != _FLOAT:
                # A graph output computed in fp16: produce it under an inner name and cast it
                # back to fp32 at the end (internal consumers read the inner tensor).
                node.output[i] = self.produced[name] = f"{name}__fp16"
        self.nodes.append(node)

    def _as(self, name: str, precision: int) -> str:
        """The name of ``name`` converted to ``precision`` (Cast or fp16 initializer, cached)."""
        if name in self.inits:
            if precision == _FLOAT:
                self.used_inits.add(name)
                return name
            return self._fp16_initializer(name)
        source = self.produced.get(name, name)
        if self.current.get(name) == precision:
            return source
        key = (name, precision)
        if key not in self.casts:
            from onnx import helper

            out = f"{name}__to_{'fp16' if precision == _FLOAT16 else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [source], [out], to=precision,
                                               name=f"{out}_cast"))
            self.casts[key] = out
        return self.casts[key]

    def _fp16_initializer(self, name: str) -> str:
        key = (name, _FLOAT16)
        if key not in self.casts:
            from onnx import numpy_helper

            values = numpy_helper.to_array(self.inits[name])
            values = np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)
            fp16 = numpy_helper.from_array(values, f"{name}__fp16")
            self.graph.initializer.append(fp16)
            self.casts[key] = fp16.name
        return self.casts[key]

    def finish(self) -> None:
        """Cast fp16 graph outputs back to fp32, drop unused fp32 initializers, re-order nodes."""
        from onnx import helper

        for name, inner in self.produced.items():
            self.nodes.append(helper.make_node("Cast", [inner], [name], to=_FLOAT,
                                               name=f"{name}__output_cast"))
        keep = [t for t in self.graph.initializer
                if t.data_type != _FLOAT or t.name in self.used_inits]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)


def _retarget_to_fp16(node) -> None:
    """Inside the fp16 region a Cast to float means fp16, and float constants are fp16."""
    from onnx import numpy_helper

    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == _FLOAT:
            attr.i = _FLOAT16
        elif attr.HasField("t") and attr.t.data_type == _FLOAT:
            values = np.clip(numpy_helper.to_array(attr.t), -_FP16_MAX, _FP16_MAX)
            attr.t.CopyFrom(numpy_helper.from_array(values.astype(np.float16), attr.t.name))


def _output_type(node, precision: int) -> int:
    if node.op_type == "Cast":
        return next(a.i for a in node.attribute if a.name == "to")
    return precision


def make_fp16_variant(onnx_path: str | Path, out_path: str | Path, contract: StageContract,
                      keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS) -> Path:
    """Write the fp16 variant of one stage graph and verify it.

    Args:
        onnx_path: the fp32 stage graph (``<stage>.onnx``).
        out_path: where to write the variant (by convention :func:`fp16_path`).
        contract: the stage's contract; the variant's I/O must still match it (fp32 everywhere).
        keep_fp32_ops: op types kept in fp32 (default: Softmax + its score path, LogSoftmax,
            LayerNormalization, Sin/Cos + their angle path).
    Returns:
        ``out_path``.
    Raises:
        ArtifactError: the converted graph fails the checker, changes the I/O or does not run.
    """
    import onnx

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = onnx.load(str(onnx_path))
    names = [v.name for v in model.graph.input]
    if names != contract.input_names:
        raise ArtifactError(f"{onnx_path}: inputs expected {contract.input_names} "
                            f"({contract.stage} contract), got {names}")
    fp16 = convert_to_fp16(model, keep_fp32_ops)
    if _io_signature(fp16.graph) != _io_signature(model.graph):
        raise ArtifactError(f"{out_path}: the fp16 rewrite changed the graph I/O of {contract.stage}")
    _set_metadata(fp16, {"precision": "fp16", "fp16_keep_fp32_ops": ",".join(keep_fp32_ops),
                         "fp16_converter": "echostream.export.fp16"})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(fp16, str(out_path))
    try:
        onnx.checker.check_model(str(out_path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ArtifactError(f"{out_path}: fp16 variant fails the ONNX checker: {exc}") from None
    _smoke_run(out_path, contract)
    return out_path


def _set_metadata(model, entries: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def _smoke_run(path: Path, contract: StageContract, batch: int = 2) -> None:
    """One ONNX Runtime CPU step from zero state: the graph loads, runs and stays finite."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feed = {}
    for spec in contract.inputs:
        shape = spec.concrete_shape(batch)
        # Zero ints are valid everywhere (token 0, unit 0, counter 0); floats get unit noise.
        feed[spec.name] = (rng.standard_normal(shape).astype(spec.dtype) if spec.dtype == "float32"
                           else np.zeros(shape, spec.dtype))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        values = session.run(None, feed)
    except Exception as exc:  # ORT's own exception types
        raise ArtifactError(f"{path}: fp16 variant does not run on ONNX Runtime: {exc}") from None
    for name, value in zip(contract.output_names, values):
        if value.dtype != np.dtype(contract.spec(name).dtype):
            raise ArtifactError(f"{path}: output {name!r} dtype expected "
                                f"{contract.spec(name).dtype}, got {value.dtype}")
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ArtifactError(f"{path}: output {name!r} is not finite after one fp16 step")


def argmax_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of positions whose argmax over the last axis (token / unit) agrees.

    Args:
        reference, candidate: ``[..., V]`` scores or log-probs of the same shape.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"argmax agreement: shape expected {list(reference.shape)}, "
                         f"got {list(candidate.shape)}")
    return float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))
