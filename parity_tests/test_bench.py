"""``echostream bench``: the quick run writes its JSON / markdown / plot with every expected key,
and the pieces that produce numbers (FLOP counting, target verdicts, memory probe) compute what
they claim. No timing is ever asserted: only structure, counts and exact arithmetic."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from echostream.bench import command as bench_command
from echostream.bench.flops import count_graph_flops, matmul_macs
from echostream.bench.streams import TRAINED_TOKENS_PER_S, trained_length_policy
from echostream.bench.report import TARGETS, check_targets, render_markdown
from echostream.bench.timing import Timing, time_calls
from echostream.bench.tuning import SPINNING, session_config, tuning_variants
from echostream.cli import main as cli_main
from echostream.contract import ALL_STAGE_NAMES
from echostream.errors import EchoStreamError
from echostream.runtime.policy import PolicyConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- the quick run, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tiny_artifacts_dir, tmp_path_factory):
    """One quick bench on the shared tiny artifacts (tuning left out: it is four more pipelines)."""
    out = tmp_path_factory.mktemp("bench")
    code = cli_main(["bench", "--quick", "--artifacts", str(tiny_artifacts_dir), "--out", str(out),
                     "--repeats", "2", "--warmup", "0", "--baseline-budget-s", "600",
                     "--skip", "tuning", "algorithms"])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_run_writes_json_markdown_and_png(quick_run):
    out, bench = quick_run
    for key in ("schema", "mode", "preset", "command", "settings", "machine", "gemm_peak", "graphs",
                "cost_vs_position", "pipeline", "backends", "memory", "tensorrt", "windows",
                "targets"):
        assert key in bench, key
    assert bench["mode"] == "quick" and bench["preset"] == "tiny"
    assert "tuning" not in bench  # --skip tuning was honoured
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "streams.png").read_bytes()[:8] == PNG_MAGIC  # throughput and p95 vs streams
    md = (out / "bench.md").read_text()
    for heading in ("## Targets", "## 1. Encoder cost", "## 2. Whole pipeline", "## 3. Backends",
                    "## 4. Memory", "## 5. TensorRT", "## 6. Windows"):
        assert heading in md, heading
    assert md == render_markdown(bench)  # the markdown is a pure function of the JSON


def test_streams_part_ends_translations_at_a_trained_length_and_weighs_held_state(quick_run):
    """Seeded weights never emit </s>: the streams part caps each translation where a trained
    model's would end (--tokens-per-s, default 4.1 per source second of the longest utterance),
    and compares RSS per stream with the state the streams really held (short unit graph or
    full), not with the contract bound."""
    _, bench = quick_run
    streams = bench["streams"]
    assert bench["settings"]["tokens_per_s"] == TRAINED_TOKENS_PER_S
    assert 1 <= streams["final_max_len"] < PolicyConfig().final_max_len
    held, bound = streams["state_bytes_per_stream"], streams["state_bytes_bound_per_stream"]
    assert 0 < held <= bound
    parser = argparse.ArgumentParser()
    bench_command.configure(parser)
    with pytest.raises(EchoStreamError, match="--tokens-per-s expected >= 0"):
        bench_command._settings(parser.parse_args(["--tokens-per-s", "-1"]), 2)


def test_trained_length_policy_scales_with_the_longest_utterance():
    pool = [np.zeros(16000 * 3, np.float32), np.zeros(int(16000 * 4.9), np.float32)]
    assert trained_length_policy(pool, 4.1).final_max_len == math.ceil(4.1 * 4.9) == 21
    assert trained_length_policy(pool, 0.0) is None  # the policy's own final_max_len


def test_window_costs_compare_the_old_and_the_sentence_windows(quick_run):
    _, bench = quick_run
    win = bench["windows"]
    assert set(win["stages"]) == {"st_ctc", "unit_decoder"}
    assert win["after"] == {"max_source_frames": 256, "max_target_tokens": 32,
                            "short_target_tokens": 8}  # tiny preset
    for entry in win["stages"].values():
        assert entry["state_bytes"]["after"] > entry["state_bytes"]["before"] > 0
        assert all(t > 0 for t in entry["ms_per_call"].values())
    # tiny ST CTC: 2 layers x (keys + values) x frames x 32 floats + the int32 counter
    assert win["stages"]["st_ctc"]["state_bytes"]["after"] == 2 * 2 * 256 * 32 * 4 + 4


def test_machine_and_peak_are_recorded(quick_run):
    _, bench = quick_run
    m = bench["machine"]
    assert m["cpu_model"] and m["threads"] == bench["settings"]["threads"] >= 1
    assert {"python", "numpy", "onnxruntime"} <= set(m["versions"])
    peak = bench["gemm_peak"]
    # Measured at the start and again at the end of the run; the higher one is the peak.
    engines = list(peak["engines"].values()) + list(peak["end_of_run"]["engines"].values())
    assert peak["peak_gflops"] == max(e["gflops"] for e in engines) > 0
    assert peak["peak_gflops_start"] == max(e["gflops"] for e in peak["engines"].values())
    for engine in engines:
        t = engine["timing"]
        assert t["min_s"] <= t["median_s"] <= t["max_s"] and t["n"] == 5


def test_cost_vs_position_curves(quick_run):
    _, bench = quick_run
    pos = bench["cost_vs_position"]
    seg = pos["segment_s"]
    assert set(pos["curves"]) == {"echostream_onnxruntime", "echostream_torch",
                                  "streamspeech_conformer_prefix"}
    for backend in ("onnxruntime", "torch"):
        points = pos["curves"][f"echostream_{backend}"]["points"]
        assert [p["position_s"] for p in points] == bench["settings"]["positions_s"]
        # Each point is the state after round(position / segment) real chained steps.
        assert [p["steps"] for p in points] == [max(1, round(p["position_s"] / seg)) for p in points]
        assert all(p["n"] == 2 and p["min_s"] <= p["median_s"] <= p["max_s"] for p in points)
    base = pos["curves"]["streamspeech_conformer_prefix"]
    measured = [p["position_s"] for p in base["points"]]
    skipped = [s["position_s"] for s in base["skipped"]]
    assert measured and sorted(measured + skipped) == bench["settings"]["positions_s"]
    assert all(s["reason"] for s in base["skipped"])


def test_pipeline_counts_calls_and_flops(quick_run):
    _, bench = quick_run
    pipe = bench["pipeline"]
    assert set(pipe["stages"]) <= set(ALL_STAGE_NAMES)
    assert pipe["audio"]["seconds"] > 15 and pipe["calls_consistent"]
    enc = pipe["stages"]["encoder"]
    # One encoder step per 4S fbank frames: calls per audio second ~ 1 / segment (tail included).
    assert enc["calls"] == pytest.approx(pipe["audio"]["seconds"] / bench["cost_vs_position"]["segment_s"],
                                         abs=3)
    for name, stage in pipe["stages"].items():
        flops = bench["graphs"][name]["flops"]
        assert stage["flops_per_call"] == flops > 0
        assert stage["gflop_per_audio_s"] == pytest.approx(flops * stage["calls"] / pipe["source_s"] / 1e9)
    total = sum(s["flops_per_call"] * s["calls"] for s in pipe["stages"].values())
    assert pipe["gflop_per_audio_s"] == pytest.approx(total / pipe["source_s"] / 1e9)


def test_backends_and_memory(quick_run):
    _, bench = quick_run
    assert set(bench["backends"]) == set(ALL_STAGE_NAMES)  # the fixture has the sentence graph
    for entry in bench["backends"].values():
        assert entry["ratio_onnxruntime_over_torch"] == pytest.approx(
            entry["onnxruntime"]["median_s"] / entry["torch"]["median_s"])
    mem = bench["memory"]
    assert mem["torch_imported"] is False  # the translate child is the torch-free runtime
    assert mem["import_rss_bytes"] <= mem["loaded_rss_bytes"] <= mem["peak_rss_bytes"]
    assert mem["weights_bytes"] == sum(g["weight_bytes"] for g in bench["graphs"].values())
    assert mem["ratio"] == pytest.approx(mem["peak_rss_bytes"] / mem["weights_bytes"])
    assert bench["tensorrt"]["available"] in (True, False) and (bench["tensorrt"].get("note")
                                                               or bench["tensorrt"]["available"])


def test_every_target_has_a_verdict(quick_run):
    _, bench = quick_run
    names = {row["target"] for row in bench["targets"]}
    assert names == set(TARGETS)
    for row in bench["targets"]:
        assert row["value"] is not None, row  # the quick run measures every part it ran
        goal, op = TARGETS[row["target"]]
        assert row["met"] == (row["value"] <= goal if op == "<=" else row["value"] >= goal)


def test_render_only_reproduces_the_report(quick_run, tmp_path):
    out, bench = quick_run
    assert cli_main(["bench", "--render", str(out / "bench.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.md").read_text() == (out / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


# ---- FLOP counting --------------------------------------------------------------------------------


def test_matmul_macs_follows_numpy_matmul():
    assert matmul_macs((3, 4), (4, 5)) == 3 * 4 * 5
    assert matmul_macs((2, 1, 3, 4), (7, 4, 5)) == 2 * 7 * 3 * 4 * 5  # broadcast batch
    assert matmul_macs((4,), (4, 5)) == 4 * 5  # 1-D left operand: one row
    assert matmul_macs((3, 4), (4,)) == 3 * 4  # 1-D right operand: one column
    with pytest.raises(ValueError, match="do not contract"):
        matmul_macs((3, 4), (5, 6))


def test_count_graph_flops_on_a_known_graph(tmp_path):
    """MatMul + Gemm(transB) + Conv(groups) + ConvTranspose, batch symbolic: hand-counted FLOPs."""
    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),  # [B, 6, 8] x [8, 16]
        helper.make_node("Reshape", ["h1", "shape"], ["h2"]),  # [B*6, 16]
        helper.make_node("Gemm", ["h2", "w2"], ["h3"], transB=1),  # x [12, 16]^T -> [B*6, 12]
        helper.make_node("Reshape", ["h3", "shape3"], ["c_in"]),  # [B, 12, 6]
        helper.make_node("Conv", ["c_in", "w3"], ["c1"], group=3, pads=[1, 1]),  # k=3 -> [B, 6, 6]
        helper.make_node("ConvTranspose", ["c1", "w4"], ["y"], strides=[2]),  # [6, 2, 4] -> [B,2,14]
    ]
    inits = [init("w1", (8, 16)), init("w2", (12, 16)), init("w3", (6, 4, 3)), init("w4", (6, 2, 4)),
             numpy_helper.from_array(np.array([-1, 16], np.int64), "shape"),
             numpy_helper.from_array(np.array([1, 12, 6], np.int64), "shape3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, 14])], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    result = count_graph_flops(path)
    want = {
        "MatMul": 2 * 6 * 8 * 16,
        "Gemm": 2 * 6 * 16 * 12,
        "Conv": 2 * (1 * 6 * 6) * 4 * 3,  # every output reads Cin/g * k inputs
        "ConvTranspose": 2 * (1 * 6 * 6) * 2 * 4,  # every input scatters to Cout/g * k outputs
    }
    assert result.by_op == want and result.flops == sum(want.values())
    assert result.nodes == {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}
    assert result.weight_bytes == 4 * (8 * 16 + 12 * 16 + 6 * 4 * 3 + 6 * 2 * 4) + 8 * (2 + 3)


# ---- verdicts, timing, tuning ---------------------------------------------------------------------


def _curve(medians: list[float]) -> dict:
    positions = [5.0, 60.0, 600.0][:len(medians)]
    return {"points": [{"position_s": p, "min_s": m, "median_s": m, "max_s": m, "n": 1}
                       for p, m in zip(positions, medians)], "skipped": [], "notes": ""}


def test_targets_unmeasured_are_never_met():
    rows = check_targets({})
    assert {r["target"] for r in rows} >= set(TARGETS) - {"ort_vs_torch"}
    assert all(r["value"] is None and r["met"] is None for r in rows)


def test_targets_flatness_speedup_and_miss_notes():
    bench = {"cost_vs_position": {"curves": {
        "echostream_onnxruntime": _curve([0.010, 0.010, 0.0102]),
        "echostream_torch": _curve([0.010, 0.012, 0.020]),
        "streamspeech_conformer_prefix": _curve([0.05, 0.5]),
    }}, "pipeline": {"rtf": {"median_s": 0.3}, "fraction_of_peak_in_stages": 0.2, "stages": {
        "encoder": {"share_of_wall": 0.6, "flops_per_call": 10, "calls": 5, "fraction_of_peak": 0.2,
                    "ms_per_call": 1.0}}}}
    rows = {r["target"]: r for r in check_targets(bench)}
    assert rows["emformer_flatness_onnxruntime"]["value"] == pytest.approx(1.02)
    assert rows["emformer_flatness_onnxruntime"]["met"] is True
    assert rows["emformer_flatness_torch"]["met"] is False
    assert "+100.0 %" in rows["emformer_flatness_torch"]["note"]
    assert rows["baseline_speedup_60s"]["value"] == pytest.approx(0.5 / 0.012)
    assert rows["baseline_speedup_60s"]["met"] is True
    assert rows["pipeline_rtf"]["met"] is False and "2.0x over" in rows["pipeline_rtf"]["note"]
    assert rows["pipeline_fraction_of_peak"]["met"] is False
    assert "encoder" in rows["pipeline_fraction_of_peak"]["note"]


def test_timing_statistics():
    t = Timing.of([3.0, 1.0, 2.0, 10.0])
    assert (t.min_s, t.median_s, t.max_s, t.n) == (1.0, 2.5, 10.0, 4)
    calls = []
    timing = time_calls(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and timing.n == 4
    with pytest.raises(ValueError):
        Timing.of([])
    with pytest.raises(ValueError):
        time_calls(lambda: None, repeats=0)


def test_tuning_variants_and_session_config_is_scoped(tiny_artifacts):
    import echostream.runtime.onnxruntime_backend as backend

    assert tuning_variants(2) == [{"threads": 1, "spinning": True}, {"threads": 1, "spinning": False},
                                  {"threads": 2, "spinning": True}, {"threads": 2, "spinning": False}]
    assert tuning_variants(1) == [{"threads": 1, "spinning": True}, {"threads": 1, "spinning": False}]
    original = backend.session_options
    with session_config({SPINNING: "0"}):
        stage = backend.load_stage(tiny_artifacts, "duration", threads=2)
    assert backend.session_options is original
    assert stage.session.get_session_options().get_session_config_entry(SPINNING) == "0"
    x = np.zeros(stage.contract.data_inputs[0].concrete_shape(1), np.int32)
    assert math.isfinite(float(stage.run({"x": x})[0]["y"].sum()))


def test_sessions_reuse_freed_memory_instead_of_page_faulting_it_in(tiny_artifacts):
    """The settings behind the unit decoder's 116 -> 34 ms per call (`onnxruntime_backend.py`):
    no per-run memory-pattern block, and glibc keeping freed heap for the next step."""
    import platform

    import echostream.runtime.onnxruntime_backend as backend
    from echostream.runtime.heap import keep_freed_heap

    stage = backend.load_stage(tiny_artifacts, "unit_decoder", threads=1)
    assert stage.session.get_session_options().enable_mem_pattern is False
    assert stage.session.get_session_options().enable_cpu_mem_arena is False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip(f"mallopt is glibc's; this is {platform.system()} {platform.libc_ver()}")
    assert keep_freed_heap() is True


def test_algorithms_compare_the_agent_exact_and_incremental(streamspeech_tiny_artifacts_dir):
    """The three curves on the same audio: one cost per segment each, positions aligned, the
    agent's curve cut by its budget."""
    from echostream.bench.algorithms import at_position, compare_algorithms
    from echostream.runtime.translator import Translator

    from test_translator import bursts

    def make(backend, fidelity):
        return Translator.from_artifacts(streamspeech_tiny_artifacts_dir, backend=backend,
                                         fidelity=fidelity)

    audio = bursts(2.0, seed=1)
    curves = compare_algorithms(make, audio, budget_s=60.0, log=lambda _: None)
    assert set(curves) == {"streamspeech", "exact", "incremental"}
    for curve in curves.values():
        assert curve["positions_s"] == pytest.approx([0.32 * (k + 1) for k in range(6)] + [2.0, 2.0])
        assert all(ms > 0 for ms in curve["ms"]) and curve["stopped_at_s"] is None
    assert at_position(curves["exact"], 1.0) == curves["exact"]["ms"][3]
    tight = compare_algorithms(make, audio, budget_s=0.0, log=lambda _: None)["streamspeech"]
    assert tight["stopped_at_s"] == 0.32 and len(tight["ms"]) == 1
