"""fp16 graph variants (export/fp16.py): structure, fp32 islands, and accuracy vs the fp32 reference.

Accuracy: every fp16 stage on ONNX Runtime CPU vs the PyTorch fp32 reference over 12 chained steps
(each side fed its own next state) from zero and random states: cosine >= 0.999 for every output
and next state at every step, integer counters exact, argmax (CTC / next-token / unit) agreement
>= 99 %. Run with ``-s`` to see the measured numbers.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from echostream.contract import STAGE_NAMES, StageContract, TensorSpec, stage_contract
from echostream.errors import ArtifactError

torch = pytest.importorskip("torch")

from echostream.export.fp16 import (DEFAULT_KEEP_FP32_OPS, argmax_agreement,  # noqa: E402
                                    convert_to_fp16, fp16_path, fp32_island_nodes,
                                    make_fp16_variant)

STEPS = 12
LOG_PROB_OUTPUTS = {("encoder", "asr_log_probs"), ("st_ctc", "y"), ("mt_decoder", "y"),
                    ("unit_decoder", "y")}
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def fp16_dir(tiny_artifacts, tmp_path_factory):
    """fp16 variants of every tiny stage (seconds; the fp32 export comes from conftest)."""
    out = tmp_path_factory.mktemp("fp16")
    for stage in STAGE_NAMES:
        make_fp16_variant(tiny_artifacts.stage_path(stage), fp16_path(out / f"{stage}.onnx"),
                          tiny_artifacts.contract(stage))
    return out


def _types(model) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = model.graph
    values = list(g.input) + list(g.value_info) + list(g.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _io(model) -> list:
    return [(v.name, v.type.tensor_type.elem_type, str(v.type.tensor_type.shape))
            for v in list(model.graph.input) + list(model.graph.output)]


# ---- structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_variant_keeps_io_and_computes_in_fp16(stage, tiny_artifacts, fp16_dir):
    fp32 = onnx.load(str(tiny_artifacts.stage_path(stage)))
    fp16 = onnx.load(str(fp16_dir / f"{stage}.fp16.onnx"))
    onnx.checker.check_model(fp16, full_check=True)
    assert _io(fp16) == _io(fp32)  # names, dtypes (fp32 states included) and shapes unchanged
    meta = {p.key: p.value for p in fp16.metadata_props}
    assert meta["precision"] == "fp16"
    weights = [t for t in fp16.graph.initializer if t.data_type in (FLOAT, FLOAT16)]
    fp16_bytes = sum(len(t.raw_data) for t in weights if t.data_type == FLOAT16)
    fp32_bytes = sum(len(t.raw_data) for t in weights if t.data_type == FLOAT)
    assert fp16_bytes > fp32_bytes, "most weights should be fp16"
    types = _types(fp16)
    for node in fp16.graph.node:
        if node.op_type in DEFAULT_KEEP_FP32_OPS:
            assert types[node.input[0]] == FLOAT, f"{stage}: {node.name} ({node.op_type}) must be fp32"


def test_attention_scores_feeding_softmax_are_fp32(fp16_dir):
    model = onnx.load(str(fp16_dir / "encoder.fp16.onnx"))
    types = _types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for sm in softmaxes:
        node = producer[sm.input[0]]
        while node.op_type != "MatMul":  # walk back through mask add / scale to the score MatMul
            assert node.op_type in ("Add", "Mul", "Div", "Sub", "Where"), node.op_type
            node = producer[next(i for i in node.input if i in producer and types[i] == FLOAT)]
        assert all(types[i] == FLOAT for i in node.input), f"{node.name}: q.k^T must be fp32"


def test_island_walk_on_a_handmade_graph():
    h = onnx.helper
    nodes = [
        h.make_node("MatMul", ["q", "k"], ["s"], name="score"),
        h.make_node("Mul", ["s", "scale"], ["s2"], name="scale_mul"),
        h.make_node("Add", ["s2", "bias"], ["s3"], name="mask_add"),
        h.make_node("Relu", ["m"], ["bias"], name="mask_branch"),  # other path: stays fp16
        h.make_node("Softmax", ["s3"], ["p"], name="softmax"),
        h.make_node("Cast", ["pos"], ["posf"], to=FLOAT, name="pos_cast"),
        h.make_node("Mul", ["posf", "freq"], ["ang"], name="angle"),
        h.make_node("Sin", ["ang"], ["y"], name="sin"),
    ]
    graph = h.make_graph(nodes, "g", [], [])
    assert fp32_island_nodes(graph, DEFAULT_KEEP_FP32_OPS) == ["angle", "mask_add", "pos_cast",
                                                               "scale_mul", "score"]
    assert fp32_island_nodes(graph, ("Softmax",)) == ["mask_add", "scale_mul", "score"]


def test_fp32_output_of_a_kept_op_is_exact_and_state_read_back_stays_valid():
    """A LogSoftmax graph output must not pass through fp16; a state output that is also read
    inside the graph (cache -> attention) must give a valid graph."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "w")
    nodes = [
        h.make_node("Concat", ["cache", "x"], ["cat"], axis=1, name="append"),
        h.make_node("Slice", ["cat", "starts", "ends", "axes"], ["next_cache"], name="keep"),
        h.make_node("ReduceMean", ["next_cache", "axes"], ["pooled"], keepdims=0, name="pool"),
        h.make_node("MatMul", ["pooled", "w"], ["logits"], name="proj"),
        h.make_node("LogSoftmax", ["logits"], ["y"], axis=-1, name="lsm"),
    ]
    ints = [onnx.numpy_helper.from_array(np.array([v], np.int64), n)
            for n, v in (("starts", 2), ("ends", 6), ("axes", 1))]
    vi = h.make_tensor_value_info
    graph = h.make_graph(nodes, "g", [vi("x", FLOAT, ["B", 2, 4]), vi("cache", FLOAT, ["B", 4, 4])],
                         [vi("y", FLOAT, ["B", 5]), vi("next_cache", FLOAT, ["B", 4, 4])], [w, *ints])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    fp16 = convert_to_fp16(model)
    onnx.checker.check_model(fp16, full_check=True)
    producer = {o: n for n in fp16.graph.node for o in n.output}
    assert producer["y"].op_type == "LogSoftmax"  # no fp16 round trip after the fp32 op
    import onnxruntime as ort

    feed = {"x": rng.standard_normal((2, 2, 4)).astype(np.float32),
            "cache": rng.standard_normal((2, 4, 4)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, feed)
    got = ort.InferenceSession(fp16.SerializeToString()).run(None, feed)
    for a, b in zip(want, got):
        assert b.dtype == np.float32 and np.abs(a - b).max() < 1e-2


def test_contract_mismatch_is_refused(tiny_artifacts, tmp_path):
    wrong = StageContract("encoder", (TensorSpec("features", ("B", 3, 80)),), ())
    with pytest.raises(ArtifactError, match="inputs expected"):
        make_fp16_variant(tiny_artifacts.stage_path("encoder"), tmp_path / "e.fp16.onnx", wrong)


def test_argmax_agreement():
    a = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert argmax_agreement(a, a) == 1.0
    assert argmax_agreement(a, a[:, ::-1]) == 0.0
    with pytest.raises(ValueError, match="shape"):
        argmax_agreement(a, a[:2])


# ---- accuracy vs the fp32 PyTorch reference -------------------------------------------------------


def _chain(ref, dut, contract: StageContract, cfg, init: str, seed: int, steps: int = STEPS):
    """Chained steps on both sides; per output name: min cosine, argmax agreement, int equality."""
    from echostream.export.onnx_export import random_context, random_data
    from echostream.export.parity import cosine_similarity
    from echostream.models.state import random_state

    gen = torch.Generator().manual_seed(seed)
    host = lambda d: {k: v.numpy() for k, v in d.items()}  # noqa: E731
    batch = 2
    if not contract.states:
        state = None
    else:
        state = ref.initial_state(batch) if init == "zero" else host(random_state(contract, batch, gen))
    context = host(random_context(contract, batch, gen)) if contract.context else None
    state_r = state_d = state
    cosines, agree, ints_equal = {}, {}, True
    for _ in range(steps):
        inputs = host(random_data(contract, cfg, batch, gen))
        out_r, state_r = ref.run(inputs, state_r, context)
        out_d, state_d = dut.run(inputs, state_d, context)
        pairs = [(k, out_r[k], out_d[k]) for k in out_r]
        pairs += [(f"next_{k}", state_r[k], state_d[k]) for k in (state_r or {})]
        for name, want, got in pairs:
            if np.issubdtype(want.dtype, np.integer):
                ints_equal &= bool(np.array_equal(want, got))
                continue
            cos = cosine_similarity(want.astype(np.float64).ravel(), got.astype(np.float64).ravel())
            cosines[name] = min(cosines.get(name, 1.0), cos)
            if (contract.stage, name) in LOG_PROB_OUTPUTS:
                agree.setdefault(name, []).append(argmax_agreement(want, got))
    return cosines, {k: float(np.mean(v)) for k, v in agree.items()}, ints_equal


def _check_stage(stage, artifacts, fp16_file, init):
    from echostream.export.torch_backend import TorchStage, load_reference_model
    from echostream.runtime.onnxruntime_backend import OrtStage

    contract = artifacts.contract(stage)
    ref = TorchStage(load_reference_model(artifacts), stage)
    dut = OrtStage(fp16_file, contract, deterministic=True)
    cosines, agreement, ints_equal = _chain(ref, dut, contract, artifacts.config, init, seed=7)
    print(f"\n{stage} fp16 ({init} state, {STEPS} steps): 1 - min cosine "
          + ", ".join(f"{k}={1 - v:.1e}" for k, v in cosines.items())
          + "".join(f"; argmax agreement {k}={v:.2%}" for k, v in agreement.items()))
    assert ints_equal, f"{stage}: integer counters differ between fp16 and fp32"
    for name, cos in cosines.items():
        assert cos >= 0.999, f"{stage} {name}: cosine {cos:.6f} < 0.999"
    for name, value in agreement.items():
        assert value >= 0.99, f"{stage} {name}: argmax agreement {value:.2%} < 99%"


@pytest.mark.parametrize("init", ["zero", "random"])
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_fp16_stage_matches_fp32_reference(stage, init, tiny_artifacts, fp16_dir):
    if init == "random" and not tiny_artifacts.contract(stage).states:
        pytest.skip(f"{stage} is stateless")
    _check_stage(stage, tiny_artifacts, fp16_dir / f"{stage}.fp16.onnx", init)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_fp16_full_size_preset(stage, echostream_artifacts_dir):
    """The echostream preset (16-layer Emformer, 4-layer 512-d MT decoder), random weights."""
    from echostream.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(echostream_artifacts_dir)
    assert stage_contract(stage, artifacts.config) == artifacts.contract(stage)
    _check_stage(stage, artifacts, echostream_artifacts_dir / f"{stage}.fp16.onnx", "zero")
