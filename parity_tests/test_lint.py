"""`echostream lint`: the static TensorRT-readiness check (export/lint.py).

Hand-made graphs exercise each rule (fast, no torch); the exported tiny artifacts (fp32 and fp16)
must be clean.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper

from echostream.cli import main as cli_main
from echostream.contract import StageContract, TensorSpec
from echostream.export.lint import Violation, lint_model, lint_paths, operator_table

vi = h.make_tensor_value_info


def _const(name: str, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def _save(tmp_path, nodes, inputs=None, outputs=None, inits=(), opset=18, name="g.onnx"):
    inputs = inputs if inputs is not None else [vi("x", TP.FLOAT, ["B", 4, 8])]
    outputs = outputs if outputs is not None else [vi("y", TP.FLOAT, ["B", 4, 8])]
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _problems(path, contract=None) -> list[str]:
    return [f"{v.node} ({v.op}): {v.problem}" for v in lint_model(path, contract)]


def _clean_nodes():
    """A small attention-like step: projection, constant-axes slice of a cache, softmax, LN."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(8, np.float32), "g"),
             _const("starts", [1]), _const("ends", [5]), _const("axes", [1]), _const("red", [-1])]
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["p"], name="proj"),
        h.make_node("Concat", ["cache", "p"], ["cat"], axis=1, name="append"),
        h.make_node("Slice", ["cat", "starts", "ends", "axes"], ["next_cache"], name="keep"),
        h.make_node("Softmax", ["p"], ["s"], axis=-1, name="softmax"),
        h.make_node("ReduceMean", ["s", "red"], ["m"], keepdims=1, name="mean"),
        h.make_node("Add", ["s", "m"], ["a"], name="add"),
        h.make_node("LayerNormalization", ["a", "g"], ["y"], axis=-1, name="ln"),
    ]
    inputs = [vi("x", TP.FLOAT, ["B", 4, 8]), vi("cache", TP.FLOAT, ["B", 4, 8])]
    outputs = [vi("y", TP.FLOAT, ["B", 4, 8]), vi("next_cache", TP.FLOAT, ["B", 4, 8])]
    return nodes, inputs, outputs, inits


CLEAN_CONTRACT = StageContract("toy", (TensorSpec("x", ("B", 4, 8)),), (TensorSpec("y", ("B", 4, 8)),),
                               states=(TensorSpec("cache", ("B", 4, 8)),))


def test_clean_graph_passes(tmp_path):
    nodes, inputs, outputs, inits = _clean_nodes()
    path = _save(tmp_path, nodes, inputs, outputs, inits)
    assert lint_model(path) == []
    assert lint_model(path, CLEAN_CONTRACT) == []


def test_operator_table_is_the_11_1_matrix():
    table = operator_table()
    assert table["tensorrt_version"] == "11.1"
    assert table["source_commit"] == "7c51a63a719180eb5160c874c111746f3fb46a6b"
    assert (table["opset_min"], table["opset_max"]) == (9, 24)
    assert len(table["supported"]) == 159 and len(table["unsupported"]) == 42
    assert table["supported"]["MatMul"]["types"] == ["FP32", "FP16", "BF16"]


@pytest.mark.parametrize("case", [
    "range", "if", "loop", "nonzero", "scatter", "bool_where", "unsupported_op", "unknown_op",
    "custom_domain", "int_matmul", "reduce_axes", "unsqueeze_axes", "cumsum_axis", "topk",
    "layernorm_mean", "float64", "uint8"])
def test_bad_graph_is_reported(case, tmp_path):
    x = ["x"]
    shape_in = [vi("n", TP.INT64, [])]
    cases = {
        # (nodes, extra inputs, initializers, expected op, expected problem fragment)
        "range": ([h.make_node("Range", ["s", "n", "d"], ["r"], name="r")],
                  [vi("s", TP.INT64, []), *shape_in, vi("d", TP.INT64, [])], [], "Range", "Range is banned"),
        "if": ([h.make_node("If", ["c"], ["r"], name="branch",
                            then_branch=h.make_graph([h.make_node("Identity", ["x"], ["t"])], "t", [],
                                                     [vi("t", TP.FLOAT, None)]),
                            else_branch=h.make_graph([h.make_node("Neg", ["x"], ["e"])], "e", [],
                                                     [vi("e", TP.FLOAT, None)]))],
               [vi("c", TP.BOOL, [])], [], "If", "control flow (If) is banned"),
        "loop": ([h.make_node("Loop", ["n", "c"], [], name="loop",
                              body=h.make_graph([h.make_node("Identity", ["cond"], ["cond_out"])], "b",
                                                [vi("i", TP.INT64, []), vi("cond", TP.BOOL, [])],
                                                [vi("cond_out", TP.BOOL, [])]))],
                 [*shape_in, vi("c", TP.BOOL, [])], [], "Loop", "control flow (Loop) is banned"),
        "nonzero": ([h.make_node("NonZero", x, ["r"], name="nz")], [], [], "NonZero", "data-dependent"),
        "scatter": ([h.make_node("ScatterElements", ["x", "idx", "x"], ["r"], name="sc")],
                    [vi("idx", TP.INT64, ["B", 4, 8])], [], "ScatterElements", "in-place writes"),
        "bool_where": ([h.make_node("Where", ["c", "a", "b"], ["r"], name="w")],
                       [vi("c", TP.BOOL, [2]), vi("a", TP.BOOL, [2]), vi("b", TP.BOOL, [2])], [],
                       "Where", "BOOL"),
        "unsupported_op": ([h.make_node("Unique", x, ["r"], name="u")], [], [], "Unique",
                           "not supported by the TensorRT 11.1 ONNX parser"),
        "unknown_op": ([h.make_node("ImageDecoderX", x, ["r"], name="u")], [], [], "ImageDecoderX",
                       "not in the TensorRT 11.1 ONNX parser's operator matrix"),
        "custom_domain": ([h.make_node("FusedGemm", x, ["r"], name="fg", domain="com.microsoft")],
                          [], [], "FusedGemm", "custom-domain operator com.microsoft::FusedGemm"),
        "int_matmul": ([h.make_node("MatMul", ["i", "i"], ["r"], name="mm")],
                       [vi("i", TP.INT32, [2, 2])], [], "MatMul", "input 'i' is INT32"),
        "reduce_axes": ([h.make_node("ReduceSum", ["x", "ax"], ["r"], name="rs")],
                        [vi("ax", TP.INT64, [1])], [], "ReduceSum",
                        "axes ('ax') must be a build-time constant"),
        "unsqueeze_axes": ([h.make_node("Unsqueeze", ["x", "ax"], ["r"], name="us")],
                           [vi("ax", TP.INT64, [1])], [], "Unsqueeze", "axes ('ax') must be"),
        "cumsum_axis": ([h.make_node("CumSum", ["x", "ax"], ["r"], name="cs")],
                        [vi("ax", TP.INT64, [])], [], "CumSum", "axis ('ax') must be"),
        "topk": ([h.make_node("TopK", ["x", "k"], ["v", "i"], name="tk", sorted=0)],
                 [], [_const("k", [4000])], "TopK", "sorted must be 1"),
        "layernorm_mean": ([h.make_node("LayerNormalization", ["x", "g"], ["y1", "mean"], name="ln"),
                            h.make_node("Identity", ["mean"], ["r"], name="use_mean")],
                           [], [numpy_helper.from_array(np.ones(8, np.float32), "g")],
                           "LayerNormalization", "only Y is supported"),
        "float64": ([h.make_node("Cast", x, ["r"], to=TP.DOUBLE, name="to64")], [], [], "Cast", "float64"),
        "uint8": ([h.make_node("Cast", x, ["r"], to=TP.UINT8, name="to8")], [], [], "Cast", "UINT8"),
    }
    nodes, extra, inits, op, fragment = cases[case]
    nodes = list(nodes) + [h.make_node("Identity", ["x"], ["y"], name="out")]
    path = _save(tmp_path, nodes, [vi("x", TP.FLOAT, ["B", 4, 8]), *extra], None, inits)
    problems = _problems(path)
    assert any(f"({op})" in p and fragment in p for p in problems), problems
    if case == "topk":
        assert any("K = 4000 must be below 3840" in p for p in problems), problems


def test_dynamic_non_batch_axis(tmp_path):
    path = _save(tmp_path, [h.make_node("Identity", ["x"], ["y"], name="id")],
                 [vi("x", TP.FLOAT, ["B", "T", 8])], [vi("y", TP.FLOAT, ["B", "T", 8])])
    problems = _problems(path)
    assert "x (graph input): axis 1 is dynamic (T); only the batch axis may be" in problems
    assert "y (graph output): axis 1 is dynamic (T); only the batch axis may be" in problems


def test_opset_out_of_range(tmp_path):
    path = _save(tmp_path, [h.make_node("Identity", ["x"], ["y"], name="id")], opset=25)
    assert _problems(path) == ["model (opset): opset 25 is outside the TensorRT 10.0 parser's range 9-20"]
    assert [f"{v.node} ({v.op}): {v.problem}" for v in lint_model(path, min_tensorrt="11.1")] == [
        "model (opset): opset 25 is outside the TensorRT 11.1 parser's range 9-24"]


def test_opset_only_11_accepts(tmp_path):
    path = _save(tmp_path, [h.make_node("Identity", ["x"], ["y"], name="id")], opset=21)
    assert _problems(path) == ["model (opset): opset 21 is outside the TensorRT 10.0 parser's range "
                               "9-20 (TensorRT 11.1: 9-24)"]
    assert lint_model(path, min_tensorrt="11.1") == []


def test_the_floor_is_the_10_0_and_10_1_matrices():
    floor = operator_table()["floor"]
    assert (floor["tensorrt_version"], floor["covers"]) == ("10.0", ["10.0", "10.1"])
    assert (floor["opset_min"], floor["opset_max"]) == (9, 20)
    assert {"STFT", "HannWindow", "HammingWindow", "BlackmanWindow"} <= set(floor["not_supported"])
    assert floor["types"]["Pow"] == ["FP32", "FP16", "BF16"]
    assert floor["weights_inputs"]["Slice"] == {"3": "axes"} and floor["weights_inputs"]["Pad"] == {"3": "axes"}
    supported = operator_table()["supported"]
    assert set(floor["not_supported"]) <= set(supported), "the floor only narrows the 11.1 matrix"


def _floor_case(case):
    """(nodes, extra inputs, initializers, op, problem fragment) that only TensorRT 10.0/10.1 refuse."""
    starts, ends = _const("st", [0]), _const("en", [2])
    cases = {
        "slice_axes_input": ([h.make_node("Slice", ["x", "st", "en", "ax"], ["r"], name="sl")],
                             [vi("ax", TP.INT64, [1])], [starts, ends], "Slice",
                             "axes ('ax') must be an initializer or a Constant node for the TensorRT "
                             "10.0 and 10.1 parsers"),
        "slice_axes_folded": ([h.make_node("Cast", ["ax0"], ["ax"], to=TP.INT64, name="fold"),
                               h.make_node("Slice", ["x", "st", "en", "ax"], ["r"], name="sl")],
                              [], [starts, ends, _const("ax0", [1], np.int32)], "Slice",
                              "axes ('ax') must be an initializer or a Constant node"),
        "pad_axes": ([h.make_node("Pad", ["x", "pads", "", "ax"], ["r"], name="pad")],
                     [vi("ax", TP.INT64, [1])], [_const("pads", [0, 1])], "Pad",
                     "axes ('ax') must be an initializer or a Constant node"),
        "squeeze_axes_folded": ([h.make_node("Cast", ["ax0"], ["ax"], to=TP.INT64, name="fold"),
                                 h.make_node("Unsqueeze", ["x", "ax"], ["r"], name="us")],
                                [], [_const("ax0", [0], np.int32)], "Unsqueeze",
                                "axes ('ax') must be an initializer or a Constant node"),
        "pow_int": ([h.make_node("Pow", ["i", "i"], ["r"], name="pw")],
                    [vi("i", TP.INT32, [2])], [], "Pow",
                    "input 'i' is INT32; the TensorRT 10.0 and 10.1 parsers support Pow on FP32, FP16, BF16"),
        "stft": ([h.make_node("STFT", ["sig", "step", "win"], ["r"], name="stft")],
                 [vi("sig", TP.FLOAT, [1, 64, 1])],
                 [_const("step", 8), numpy_helper.from_array(np.ones(16, np.float32), "win")], "STFT",
                 "not supported by the TensorRT 10.0 and 10.1 ONNX parsers (TensorRT 11.x only)"),
        "hann_window": ([h.make_node("HannWindow", ["n"], ["r"], name="hann")],
                        [], [_const("n", 16, np.int32)], "HannWindow", "TensorRT 11.x only"),
        "constant_of_shape_int64": ([h.make_node("ConstantOfShape", ["shape"], ["r"], name="cos",
                                                 value=numpy_helper.from_array(np.array([1], np.int64)))],
                                    [], [_const("shape", [2, 3])], "ConstantOfShape",
                                    "value is INT64; the TensorRT 10.0 and 10.1 parsers support "
                                    "ConstantOfShape values of FP32"),
    }
    return cases[case]


FLOOR_CASES = ["slice_axes_input", "slice_axes_folded", "pad_axes", "squeeze_axes_folded", "pow_int",
               "stft", "hann_window", "constant_of_shape_int64"]


@pytest.mark.parametrize("case", FLOOR_CASES)
def test_tensorrt_10_restrictions(case, tmp_path):
    """Graphs the 11.1 matrix accepts but the 10.0/10.1 parsers refuse: reported by default, and
    not with --min-tensorrt 11.1."""
    nodes, extra, inits, op, fragment = _floor_case(case)
    nodes = list(nodes) + [h.make_node("Identity", ["x"], ["y"], name="out")]
    path = _save(tmp_path, nodes, [vi("x", TP.FLOAT, ["B", 4, 8]), *extra], None, inits)
    problems = _problems(path)
    assert any(f"({op})" in p and fragment in p for p in problems), problems
    eleven = [f"{v.node} ({v.op}): {v.problem}" for v in lint_model(path, min_tensorrt="11.1")]
    assert not any("10.0" in p for p in eleven), eleven
    assert len(eleven) < len(problems)


def test_constant_axes_pass_the_floor(tmp_path):
    """Initializers and Constant nodes are what the 10.x parsers take as weights."""
    nodes = [h.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(np.array([1], np.int64)),
                         name="axc"),
             h.make_node("Slice", ["x", "st", "en", "ax"], ["s"], name="sl"),
             h.make_node("Pad", ["s", "pads", "", "pax"], ["y"], name="pad")]
    inits = [_const("st", [0]), _const("en", [4]), _const("pads", [0, 0]), _const("pax", [2])]
    path = _save(tmp_path, nodes, inits=inits)
    assert lint_model(path) == []


def test_fp8_means_e4m3_only(tmp_path):
    """FLOAT8E4M3FN through DequantizeLinear is TensorRT's FP8; E5M2 is not a TensorRT type."""
    def graph(elem_type, name):
        q = numpy_helper.from_array(np.zeros((4, 8), np.uint8), "q")
        q.data_type = elem_type  # raw 8-bit payload reinterpreted as the FP8 format
        nodes = [h.make_node("DequantizeLinear", ["q", "scale"], ["w"], name="dq"),
                 h.make_node("Add", ["x", "w"], ["y"], name="add")]
        return _save(tmp_path, nodes, inits=[q, numpy_helper.from_array(np.float32(1.0), "scale")],
                     opset=19, name=name)

    assert lint_model(graph(TP.FLOAT8E4M3FN, "e4m3.onnx")) == []
    problems = _problems(graph(TP.FLOAT8E5M2, "e5m2.onnx"))
    assert any("FP8E5M2" in p and "E4M3" in p for p in problems), problems


def test_contract_checks(tmp_path):
    nodes, inputs, outputs, inits = _clean_nodes()
    inputs[0] = vi("x", TP.FLOAT, [2, 4, 8])  # batch frozen
    inputs[1] = vi("cache", TP.FLOAT, ["B", 5, 8])  # wrong static dim
    path = _save(tmp_path, nodes, inputs, outputs, inits)
    problems = _problems(path, CLEAN_CONTRACT)
    assert "x (graph input): batch axis 0 is fixed to 2; the contract declares it dynamic" in problems
    assert "cache (graph input): axis 1 expected 4, got 5" in problems
    extra = StageContract("toy", CLEAN_CONTRACT.data_inputs, CLEAN_CONTRACT.data_outputs
                          + (TensorSpec("z", ("B", 3)),), states=CLEAN_CONTRACT.states)
    assert "z (graph output): declared by the toy contract but missing from the graph" in \
        _problems(path, extra)


def test_violation_line_format():
    v = Violation("encoder.onnx", "node_7", "Range", "Range is banned")
    assert str(v) == "encoder.onnx: node_7 (Range): Range is banned"


def test_unreadable_file_is_a_violation(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    (only,) = lint_model(bad)
    assert (only.node, only.op) == ("model", "load")


def test_cli_exit_codes_and_lines(tmp_path, capsys):
    nodes, inputs, outputs, inits = _clean_nodes()
    clean = _save(tmp_path, nodes, inputs, outputs, inits, name="clean.onnx")
    assert cli_main(["lint", str(clean)]) == 0
    bad = _save(tmp_path, [h.make_node("NonZero", ["x"], ["r"], name="nz"),
                           h.make_node("Identity", ["x"], ["y"], name="id")], name="bad.onnx")
    capsys.readouterr()
    assert cli_main(["lint", str(clean), str(bad)]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "bad.onnx: nz (NonZero): NonZero has a data-dependent output shape; use a mask of fixed shape"]
    assert "2 graph(s), 1 violation(s)" in out.err
    assert cli_main(["lint", str(tmp_path / "missing")]) == 2


def test_folder_uses_manifest_contracts(tmp_path):
    """A folder's manifest config gives each <stage>[.fp16].onnx its contract."""
    from echostream.config import get_preset

    cfg = get_preset("tiny").to_dict()
    (tmp_path / "manifest.json").write_text(json.dumps({"config": cfg}))
    # duration graph with the wrong window length: the contract check must catch it
    w = cfg["vocoder"]["duration_window"]
    nodes = [h.make_node("Cast", ["x"], ["y"], to=TP.FLOAT, name="c")]
    _save(tmp_path, nodes, [vi("x", TP.INT32, ["B", w + 1])], [vi("y", TP.FLOAT, ["B", w + 1])],
          name="duration.fp16.onnx")
    files, violations = lint_paths([tmp_path])
    assert [f.name for f in files] == ["duration.fp16.onnx"]
    assert {str(v) for v in violations} == {
        f"duration.fp16.onnx: x (graph input): axis 1 expected {w}, got {w + 1}",
        f"duration.fp16.onnx: y (graph output): axis 1 expected {w}, got {w + 1}"}


def test_exported_tiny_artifacts_are_clean(tiny_artifacts_copy):
    """Every exported tiny stage graph, and its fp16 variant, passes the lint."""
    pytest.importorskip("torch")
    from echostream.contract import stage_contract
    from echostream.export.fp16 import fp16_path, make_fp16_variant

    cfg = json.loads((tiny_artifacts_copy / "manifest.json").read_text())["config"]
    for onnx_file in sorted(tiny_artifacts_copy.glob("*.onnx")):
        stage = onnx_file.name.split(".")[0]
        make_fp16_variant(onnx_file, fp16_path(onnx_file), stage_contract(stage, cfg))
    files, violations = lint_paths([tiny_artifacts_copy])
    assert len(files) == 18  # 7 stages + the short unit graph + the sentence graph, fp32 and fp16
    assert violations == []


@pytest.mark.slow
def test_exported_echostream_artifacts_are_clean(echostream_artifacts_dir, capsys):
    """The full-size preset: all 16 graphs (7 stages + the short unit graph, fp32 + fp16) pass
    `echostream lint`."""
    assert cli_main(["lint", str(echostream_artifacts_dir)]) == 0, capsys.readouterr()
    files, violations = lint_paths([echostream_artifacts_dir])
    assert len(files) == 16 and violations == []
