"""`echostream lint`: a static TensorRT-readiness check of exported ONNX graphs.

TensorRT cannot run everywhere, but whether its ONNX parser will accept a graph can mostly be read
off the graph itself. This module checks every node against the parser's operator matrix
(``tensorrt_ops.json``: TensorRT 11.1, onnx-tensorrt ``docs/operators.md``) and against the
project's own state rules (DESIGN §4): no control flow or data-dependent shapes, batch as the only
dynamic axis, constant axes where the parser needs them, no float64 / 8-bit tensors.

**What it guarantees.** By default a clean graph parses on every TensorRT from **10.0** to 11.1:
on top of the 11.1 matrix it applies what the 10.0/10.1 matrices restrict further (the ``floor``
section of ``tensorrt_ops.json``): opset 9-20, no operators that only 11.x parses (STFT, the window
ops, Attention, RMSNormalization, RotaryEmbedding, Swish, TensorScatter, DeformConv), ``axes`` of
Slice/Pad/Squeeze/Unsqueeze/Reduce* (and CumSum's ``axis``, OneHot's ``depth``) as initializers or
Constant nodes, Pow on floats only, Constant/ConstantOfShape values of the 10.0 types.
``--min-tensorrt 11.1`` checks the 11.1 matrix alone. FP8 means E4M3 (``FLOAT8E4M3FN``) only,
and only through Q/DQ; the other 8-bit float formats are not TensorRT types.

Each problem is one :class:`Violation`, printed as ``<file>: <node name> (<op>): <problem>``.
Graph-level problems use ``model (opset)`` or ``<tensor> (graph input|graph output)``.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from echostream.contract import BATCH, StageContract, TensorSpec, stage_contract
from echostream.errors import ArtifactError

OPS_FILE = Path(__file__).with_name("tensorrt_ops.json")

# Banned by the state rules even where the parser accepts them (DESIGN §4.5): control flow and
# data-dependent shapes break fixed-shape engines, one batch-only profile and CUDA-graph capture.
BANNED_OPS = {
    "If": "control flow (If) is banned: branch on data outside the graph or use arithmetic masks",
    "Loop": "control flow (Loop) is banned: unroll over a fixed count or step from the runtime",
    "Scan": "control flow (Scan) is banned: unroll over a fixed count or step from the runtime",
    "NonZero": "NonZero has a data-dependent output shape; use a mask of fixed shape",
    "Range": "Range is banned: build index vectors as constants (see models/attention.py)",
}
SCATTER_PROBLEM = "{op} is banned (in-place writes); update caches with Concat + a constant Slice"

# ONNX TensorProto element types -> the names the TensorRT operator matrix uses.
# TensorRT's FP8 is E4M3 (ONNX FLOAT8E4M3FN) only: the other 8-bit float formats keep their own
# names here, so they match no type list of the matrix.
_TRT_TYPE_NAMES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "STRING", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64",
    14: "COMPLEX64", 15: "COMPLEX128", 16: "BF16", 17: "FP8", 18: "FP8E4M3FNUZ", 19: "FP8E5M2",
    20: "FP8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FP4", 24: "FP8E8M0",
}
_OTHER_FP8 = {"FP8E4M3FNUZ", "FP8E5M2", "FP8E5M2FNUZ", "FP8E8M0"}
MIN_TENSORRT_CHOICES = ("10.0", "11.1")
_PLAIN_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"}
_QUANTIZED_TYPES = {"INT8", "FP8", "INT4", "FP4"}  # only through explicit Q/DQ nodes
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Bernoulli", "Multinomial"}
_TOPK_MAX_K = 3840


@dataclass(frozen=True)
class Violation:
    """One reason the TensorRT parser (or the state rules) would reject a graph."""

    file: str
    node: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.node} ({self.op}): {self.problem}"


@functools.lru_cache(maxsize=1)
def operator_table() -> dict[str, Any]:
    """The parser's operator matrix: ``supported`` (op -> types, notes), ``unsupported``, opsets."""
    with open(OPS_FILE, encoding="utf-8") as f:
        table = json.load(f)
    table["unsupported"] = set(table["unsupported"])
    return table


def type_name(elem_type: int) -> str:
    return _TRT_TYPE_NAMES.get(elem_type, f"type#{elem_type}")


# ---- graph facts ------------------------------------------------------------------------------


class _GraphFacts:
    """Element types, constant tensors and consumers of one (sub)graph and its enclosing scopes."""

    def __init__(self, graph, outer: "_GraphFacts | None" = None):
        self.types: dict[str, int] = dict(outer.types) if outer else {}
        self.values: dict[str, Any] = dict(outer.values) if outer else {}
        self.constant: set[str] = set(outer.constant) if outer else set()
        self.weights: set[str] = set(outer.weights) if outer else set()  # what a parser sees as weights
        graph_inputs = {i.name for i in graph.input}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            if init.name not in graph_inputs:  # an initializer that is also an input is overridable
                self.constant.add(init.name)
                self.weights.add(init.name)
                self.values[init.name] = init
        for node in graph.node:
            self._note_constant(node)
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}

    def _note_constant(self, node) -> None:
        if node.op_type == "Constant":
            self.constant.update(node.output)
            self.weights.update(node.output)
            for attr in node.attribute:
                if attr.name == "value":
                    self.values[node.output[0]] = attr.t
        elif node.op_type not in _RANDOM_OPS and node.input and all(
            (not n) or n in self.constant for n in node.input
        ):
            self.constant.update(node.output)  # foldable at build time

    def int_value(self, name: str) -> list[int] | None:
        """The integer contents of a constant tensor, when they are known."""
        if name not in self.values:
            return None
        from onnx import numpy_helper

        return [int(v) for v in numpy_helper.to_array(self.values[name]).reshape(-1)]


def _load(path: Path):
    import onnx

    model = onnx.load(str(path))
    try:
        # Types of intermediate tensors come from inference; a graph ORT can run but inference
        # cannot fully type still gets every other check.
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort here, the checker runs elsewhere
        pass
    return model


def default_opset(model) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


# ---- the checks -------------------------------------------------------------------------------


def lint_model(path: str | Path, contract: StageContract | None = None,
               min_tensorrt: str = "10.0") -> list[Violation]:
    """All TensorRT-readiness violations of one ONNX file (an empty list when it is clean).

    Args:
        path: an ``.onnx`` file (external weights beside it are loaded too).
        contract: the stage's I/O contract; when given, graph I/O must match it exactly and only
            its ``"B"`` axes may be dynamic. Without it, axis 0 of graph I/O is the only dynamic axis
            allowed.
        min_tensorrt: the oldest TensorRT the graph must parse on: ``"10.0"`` (default: the 11.1
            matrix plus the 10.0/10.1 restrictions) or ``"11.1"`` (the 11.1 matrix alone).
    """
    if min_tensorrt not in MIN_TENSORRT_CHOICES:
        raise ValueError(f"min_tensorrt expected one of {list(MIN_TENSORRT_CHOICES)}, got {min_tensorrt!r}")
    floor = operator_table()["floor"] if min_tensorrt == "10.0" else None
    path = Path(path)
    file = path.name
    try:
        model = _load(path)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported as a violation
        return [Violation(file, "model", "load", f"cannot read the ONNX file: {exc}")]
    opset = default_opset(model)
    out = list(_check_opset(file, opset, floor))
    out += _check_io(file, model.graph, contract)
    facts = _GraphFacts(model.graph)
    out += _check_tensor_types(file, model.graph, facts)
    out += _check_graph_nodes(file, model.graph, facts, opset or 0, prefix="", floor=floor)
    return out


def _check_opset(file: str, opset: int | None, floor: dict[str, Any] | None) -> Iterator[Violation]:
    table = operator_table()
    lo, hi = table["opset_min"], table["opset_max"]
    if opset is None:
        yield Violation(file, "model", "opset", "no default-domain (ai.onnx) opset is imported")
    elif floor is not None and not floor["opset_min"] <= opset <= floor["opset_max"]:
        also = f" (TensorRT {table['tensorrt_version']}: {lo}-{hi})" if lo <= opset <= hi else ""
        yield Violation(file, "model", "opset",
                        f"opset {opset} is outside the TensorRT {floor['tensorrt_version']} parser's "
                        f"range {floor['opset_min']}-{floor['opset_max']}{also}")
    elif not lo <= opset <= hi:
        yield Violation(file, "model", "opset",
                        f"opset {opset} is outside the TensorRT {table['tensorrt_version']} "
                        f"parser's range {lo}-{hi}")


def _dims(vi) -> list[int | str | None]:
    """Static size, symbolic name, or None (unknown) per axis of a graph input/output."""
    shape = vi.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _check_io(file: str, graph, contract: StageContract | None) -> Iterator[Violation]:
    initializers = {i.name for i in graph.initializer}
    for kind, values in (("graph input", graph.input), ("graph output", graph.output)):
        specs = {} if contract is None else {
            t.name: t for t in (contract.inputs if kind == "graph input" else contract.outputs)}
        seen = set()
        for vi in values:
            if vi.name in initializers:
                continue
            seen.add(vi.name)
            if not vi.type.HasField("tensor_type"):
                yield Violation(file, vi.name, kind, "is not a tensor (sequences/maps are unsupported)")
                continue
            yield from _check_io_dtype(file, vi, kind, specs.get(vi.name))
            yield from _check_io_shape(file, vi, kind, specs.get(vi.name), contract)
        for name in sorted(set(specs) - seen):
            yield Violation(file, name, kind,
                            f"declared by the {contract.stage} contract but missing from the graph")


def _check_io_dtype(file: str, vi, kind: str, spec: TensorSpec | None) -> Iterator[Violation]:
    got = type_name(vi.type.tensor_type.elem_type)
    if spec is not None:
        want = {"float32": "FP32", "int32": "INT32", "float16": "FP16"}.get(spec.dtype, spec.dtype)
        if got != want:
            yield Violation(file, vi.name, kind, f"dtype expected {want} (contract), got {got}")
    elif got not in _PLAIN_TYPES | {"UINT8"}:
        yield Violation(file, vi.name, kind, f"dtype {got} is not a TensorRT I/O type")


def _check_io_shape(file: str, vi, kind: str, spec: TensorSpec | None,
                    contract: StageContract | None) -> Iterator[Violation]:
    dims = _dims(vi)
    if contract is not None and spec is None:
        yield Violation(file, vi.name, kind, f"not in the {contract.stage} contract")
        return
    if spec is not None and len(dims) != len(spec.shape):
        yield Violation(file, vi.name, kind,
                        f"rank expected {len(spec.shape)} {list(spec.shape)}, got {len(dims)}")
        return
    for axis, dim in enumerate(dims):
        declared = spec.shape[axis] if spec is not None else (BATCH if axis == 0 else None)
        dynamic = not isinstance(dim, int)
        if dim == 0:
            yield Violation(file, vi.name, kind, f"axis {axis} has length 0 (no empty tensors)")
        elif dynamic and declared != BATCH:
            yield Violation(file, vi.name, kind,
                            f"axis {axis} is dynamic ({dim or '?'}); only the batch axis may be")
        elif spec is not None and declared == BATCH and not dynamic:
            yield Violation(file, vi.name, kind,
                            f"batch axis {axis} is fixed to {dim}; the contract declares it dynamic")
        elif spec is not None and declared != BATCH and dim != declared:
            yield Violation(file, vi.name, kind, f"axis {axis} expected {declared}, got {dim}")


def _check_tensor_types(file: str, graph, facts: _GraphFacts) -> Iterator[Violation]:
    """Tensors inside the graph: float64 and 8-bit/quantized types do not belong in our engines."""
    io_names = {v.name for v in graph.input} | {v.name for v in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    reported = set()
    for name, elem_type in facts.types.items():
        dtype = type_name(elem_type)
        if dtype in _PLAIN_TYPES or name in reported or name in io_names:
            continue  # graph I/O types are checked with the I/O
        node = producers.get(name)
        where = (node.name or name, node.op_type) if node is not None else (name, "initializer")
        if dtype in _QUANTIZED_TYPES and (
            (node is not None and node.op_type in _QDQ_OPS)
            or any(c.op_type == "DequantizeLinear" for c in facts.consumers.get(name, []))
        ):
            continue
        reported.add(name)
        if dtype == "FP64":
            problem = f"tensor {name!r} is float64 (TensorRT narrows it to float32 with clamping)"
        elif dtype in _OTHER_FP8:
            problem = (f"tensor {name!r} is {dtype}; TensorRT's FP8 is E4M3 (FLOAT8E4M3FN) only, "
                       "through Q/DQ")
        elif dtype in _QUANTIZED_TYPES | {"UINT8"}:
            problem = f"tensor {name!r} is {dtype}; 8-bit and lower types only pass through Q/DQ"
        else:
            problem = f"tensor {name!r} has type {dtype}, which TensorRT does not support"
        yield Violation(file, where[0], where[1], problem)


def _check_graph_nodes(file: str, graph, facts: _GraphFacts, opset: int, prefix: str,
                       floor: dict[str, Any] | None = None) -> Iterator[Violation]:
    for index, node in enumerate(graph.node):
        label = prefix + (node.name or f"node#{index}")
        problems = list(_check_node(file, label, node, facts, opset))
        yield from problems
        if floor is not None and not any("not supported" in p.problem or "not in the" in p.problem
                                         or "custom-domain" in p.problem for p in problems):
            yield from (Violation(file, label, node.op_type, p)
                        for p in _floor_problems(node, facts, opset, floor))
        for attr in node.attribute:  # bodies of If/Loop/Scan (already flagged, but look inside)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _check_graph_nodes(file, sub, _GraphFacts(sub, facts), opset,
                                              prefix=f"{label}/", floor=floor)


def _check_node(file: str, label: str, node, facts: _GraphFacts, opset: int) -> Iterator[Violation]:
    op = node.op_type
    table = operator_table()
    version = table["tensorrt_version"]

    def v(problem: str) -> Violation:
        return Violation(file, label, op, problem)

    if node.domain not in ("", "ai.onnx"):
        yield v(f"custom-domain operator {node.domain}::{op} is not in the TensorRT ONNX parser")
        return
    if op in BANNED_OPS:
        yield v(BANNED_OPS[op])
    elif op.startswith("Scatter"):
        yield v(SCATTER_PROBLEM.format(op=op))
    if op in table["unsupported"]:
        yield v(f"not supported by the TensorRT {version} ONNX parser")
        return
    row = table["supported"].get(op)
    if row is None:
        yield v(f"not in the TensorRT {version} ONNX parser's operator matrix")
        return
    yield from (v(p) for p in _type_problems(node, row["types"], facts, opset, version))
    yield from (v(p) for p in _restriction_problems(node, facts))


def _main_type_inputs(node, opset: int) -> list[str]:
    """Names of the inputs bound to the operator's first type variable (the data type the
    matrix's type list refers to), e.g. X/Y of Where but not its condition."""
    from onnx import defs

    try:
        schema = defs.get_schema(node.op_type, max(opset, 1), "")
    except Exception:  # noqa: BLE001 - an op unknown to this onnx version is checked elsewhere
        return []
    type_vars = {tc.type_param_str for tc in schema.type_constraints}
    formals = list(schema.inputs)
    main = next((f.type_str for f in formals if f.type_str in type_vars), None)
    if main is None:
        return []
    names = []
    for i, name in enumerate(node.input):
        if not name:
            continue
        if i < len(formals):
            formal = formals[i]
        elif formals and formals[-1].option == defs.OpSchema.FormalParameterOption.Variadic:
            formal = formals[-1]
        else:
            continue
        if formal.type_str == main:
            names.append(name)
    return names


# Operators whose matrix types are those of the output (``output_datatype``), not of an input.
_OUTPUT_TYPED = {"HannWindow", "HammingWindow", "BlackmanWindow"}


def _type_problems(node, allowed: Sequence[str], facts: _GraphFacts, opset: int,
                   version: str) -> Iterator[str]:
    if node.op_type in _OUTPUT_TYPED:
        dtype = type_name(_attr(node, "output_datatype", 1))
        if dtype not in allowed:
            yield (f"output_datatype is {dtype}; the TensorRT {version} parser supports "
                   f"{node.op_type} on {', '.join(allowed)}")
        return
    for name in _main_type_inputs(node, opset):
        elem_type = facts.types.get(name)
        if elem_type is None:
            continue
        dtype = type_name(elem_type)
        if dtype not in allowed:
            yield (f"input {name!r} is {dtype}; the TensorRT {version} parser supports "
                   f"{node.op_type} on {', '.join(allowed)}")


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _restriction_problems(node, facts: _GraphFacts) -> Iterator[str]:
    op, inputs = node.op_type, list(node.input)

    def const_input(index: int, what: str) -> Iterator[str]:
        if len(inputs) > index and inputs[index] and inputs[index] not in facts.constant:
            yield f"{what} ({inputs[index]!r}) must be a build-time constant"

    if op.startswith("Reduce"):
        yield from const_input(1, "axes")
    elif op in ("Squeeze", "Unsqueeze"):
        yield from const_input(1, "axes")
    elif op == "CumSum":
        yield from const_input(1, "axis")
    elif op == "Where" and len(inputs) == 3:
        if any(facts.types.get(n) == 9 for n in inputs[1:]):
            yield "Where selects between BOOL tensors; select in a numeric type and compare after"
    elif op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            yield "sorted must be 1"
        yield from const_input(1, "K")
        k = facts.int_value(inputs[1]) if len(inputs) > 1 else None
        if k and k[0] >= _TOPK_MAX_K:
            yield f"K = {k[0]} must be below {_TOPK_MAX_K}"
    elif op == "LayerNormalization":
        for extra in (n for n in node.output[1:] if n):
            if facts.consumers.get(extra) or extra in facts.graph_outputs:
                yield f"optional output {extra!r} (Mean/InvStdDev) is used; only Y is supported"
    elif op == "Dropout" and len(inputs) > 2 and inputs[2]:
        value = facts.int_value(inputs[2])
        if inputs[2] not in facts.constant or value != [0]:
            yield "training_mode must be a constant false (inference only)"


# Inputs the 11.1 rules already require to be build-time constants (see _restriction_problems).
_CONSTANT_RULES = {"Squeeze": 1, "Unsqueeze": 1, "CumSum": 1, "TopK": 1}


def _floor_problems(node, facts: _GraphFacts, opset: int, floor: dict[str, Any]) -> Iterator[str]:
    """What the TensorRT 10.0/10.1 parsers refuse although the 11.1 matrix accepts it."""
    op, inputs = node.op_type, list(node.input)
    older = f"TensorRT {' and '.join(floor['covers'])}"
    if op in floor["not_supported"]:
        yield f"not supported by the {older} ONNX parsers (TensorRT 11.x only)"
        return
    allowed = floor["types"].get(op)
    if allowed:
        for name in _main_type_inputs(node, opset):
            elem_type = facts.types.get(name)
            eleven = operator_table()["supported"].get(op, {}).get("types", [])
            if elem_type is not None and type_name(elem_type) not in allowed \
                    and type_name(elem_type) in eleven:  # else the 11.1 rule has said it
                yield (f"input {name!r} is {type_name(elem_type)}; the {older} parsers support {op} "
                       f"on {', '.join(allowed)}")
    allowed = floor["value_types"].get(op)
    if allowed:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        dtype = type_name(value.data_type) if value is not None else ("FP32" if op == "ConstantOfShape" else None)
        if dtype is not None and dtype not in allowed:
            yield f"value is {dtype}; the {older} parsers support {op} values of {', '.join(allowed)}"
    rules = floor["weights_inputs"].get(op) or (
        floor["weights_inputs"].get("Reduce*") if op.startswith("Reduce") else None) or {}
    for index, what in rules.items():
        i = int(index)
        if len(inputs) <= i or not inputs[i] or inputs[i] in facts.weights:
            continue
        if inputs[i] not in facts.constant and (op.startswith("Reduce") or _CONSTANT_RULES.get(op) == i):
            continue  # already reported by the 11.1 rule: must be a build-time constant
        yield f"{what} ({inputs[i]!r}) must be an initializer or a Constant node for the {older} parsers"


# ---- folders and the CLI ----------------------------------------------------------------------


def stage_of(path: Path) -> str:
    """Stage name from an artifact file name: ``encoder.onnx`` / ``encoder.fp16.onnx`` -> encoder."""
    return path.name.split(".", 1)[0]


def _manifest_config(folder: Path) -> dict[str, Any] | None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{manifest}: cannot read the model config ({exc})") from None


def _contract_for(path: Path, config: dict[str, Any] | None) -> StageContract | None:
    if config is None:
        return None
    try:
        return stage_contract(stage_of(path), config)
    except (ValueError, KeyError):
        return None  # a graph that is not a stage (e.g. a helper graph): lint it without contract


def lint_paths(paths: Iterable[str | Path], min_tensorrt: str = "10.0"
               ) -> tuple[list[Path], list[Violation]]:
    """Lint files and artifact folders (every ``*.onnx`` in them, with the manifest's contracts);
    ``min_tensorrt`` as for :func:`lint_model`.

    Returns:
        (files checked, violations).
    """
    files: list[tuple[Path, StageContract | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            config = _manifest_config(p)
            found = sorted(p.glob("*.onnx"))
            if not found:
                raise ArtifactError(f"{p}: no *.onnx files to lint")
            files += [(f, _contract_for(f, config)) for f in found]
        elif p.is_file():
            files.append((p, _contract_for(p, _manifest_config(p.parent))))
        else:
            raise ArtifactError(f"{p}: no such file or folder")
    violations = [v for f, c in files for v in lint_model(f, c, min_tensorrt)]
    return [f for f, _ in files], violations


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="artifacts folder(s) (every *.onnx, contracts from manifest.json) "
                             "or single .onnx files")
    parser.add_argument("--min-tensorrt", choices=MIN_TENSORRT_CHOICES, default="10.0",
                        help="oldest TensorRT the graphs must parse on: 10.0 (default: the 11.1 "
                             "matrix plus the 10.0/10.1 restrictions) or 11.1 (the 11.1 matrix alone)")


def main(args: argparse.Namespace) -> int:
    files, violations = lint_paths(args.paths, args.min_tensorrt)
    for v in violations:
        print(v)
    table = operator_table()
    target = (f"TensorRT {table['floor']['tensorrt_version']} to {table['tensorrt_version']} ONNX "
              "parsers" if args.min_tensorrt == "10.0" else
              f"TensorRT {table['tensorrt_version']} ONNX parser matrix")
    print(f"echostream lint: {len(files)} graph(s), {len(violations)} violation(s) against the "
          f"{target} and the state rules", file=sys.stderr)
    return 1 if violations else 0
