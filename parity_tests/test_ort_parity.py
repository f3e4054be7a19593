"""Every stage on ONNX Runtime vs the PyTorch reference (`echostream parity`), fp32, tiny preset;
plus proof that the checks can fail, and one slow run on the full echostream preset."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from echostream import cli
from echostream.contract import exported_stage_names
from echostream.export.manifest import add_files
from echostream.export.parity import (Comparison, Tolerance, cosine_similarity, format_table,
                                      run_parity)
from echostream.export.torch_backend import TorchStage
from echostream.models.weights import load_checkpoint, save_checkpoint
from echostream.runtime.artifacts import load_artifacts
from echostream.runtime.backends import load_stage

STATEFUL = ("encoder", "st_ctc", "mt_source", "mt_decoder", "unit_decoder", "unit_decoder_short")


def _checks(results) -> dict[tuple[str, str], object]:
    return {(r.stage, r.check): r for r in results}


def test_every_stage_matches_the_reference(tiny_artifacts):
    results = run_parity(tiny_artifacts, "onnxruntime", steps=10)
    table = format_table(results)
    assert all(r.passed for r in results), table
    checks = _checks(results)
    for stage in STATEFUL:
        for check in ("zero-state chain", "random-state chain", "batch positions"):
            assert (stage, check) in checks, (stage, check)
    for stage in ("duration", "vocoder"):
        assert (stage, "random inputs") in checks
    assert ("encoder", "full utterance") in checks and ("st_ctc", "full utterance") in checks
    for r in results:
        assert r.max_abs <= 1e-4 and r.cosine > 0.9999, (r.stage, r.check)
    # Something was actually compared: fp32 graphs are not bit-identical to eager torch everywhere.
    assert max(r.max_abs for r in results) > 0


def test_parity_fails_when_the_graph_is_not_the_reference(tiny_artifacts_copy):
    """Perturb the reference weights (not the graph): chains must fail, batch-vs-alone must not."""
    root = tiny_artifacts_copy
    model, cfg = load_checkpoint(root / "weights.safetensors")
    with torch.no_grad():
        next(model.encoder.subsampling.parameters()).add_(1e-2)
    save_checkpoint(model, cfg, root)
    add_files(root, ["weights.safetensors"])
    results = _checks(run_parity(load_artifacts(root), "onnxruntime", steps=3, stages=["encoder"]))
    assert not results[("encoder", "zero-state chain")].passed
    assert not results[("encoder", "random-state chain")].passed
    assert not results[("encoder", "full utterance")].passed
    assert results[("encoder", "batch positions")].passed  # backend vs itself: still consistent


def test_comparison_metrics():
    cmp = Comparison()
    a = np.array([1.0, 2.0, 3.0], np.float32)
    cmp.add("y", a, a + np.array([0.0, 0.5, 0.0], np.float32))
    assert cmp.max_abs == pytest.approx(0.5) and cmp.mean_abs == pytest.approx(0.5 / 3)
    assert cmp.worst == "y" and cmp.cosine < 1.0
    cmp.add("n", np.array([1, 2], np.int32), np.array([1, 3], np.int32))
    assert cmp.int_mismatch == ["n"]
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    assert cosine_similarity(np.ones(3), np.array([1.0, np.nan, 1.0])) == 0.0
    nan = Comparison()
    nan.add("y", a, np.full(3, np.nan, np.float32))
    assert not Tolerance(cosine=0.999).passes(nan.max_abs, nan.cosine)
    assert not Tolerance(max_abs=1e-4).passes(nan.max_abs, nan.cosine)
    with pytest.raises(ValueError, match=r"y: shape expected \[3\], got \[2\]"):
        cmp.add("y", a, a[:2])


def test_torch_backend_runs_the_reference_exactly(tiny_artifacts, tiny_model):
    stage = load_stage(tiny_artifacts, "mt_decoder", backend="torch")
    assert isinstance(stage, TorchStage)
    g = torch.Generator().manual_seed(3)
    frames = tiny_model.cfg.sentence.max_source_frames
    context = {"cross_keys": torch.randn(2, 2, frames, 32, generator=g),
               "cross_values": torch.randn(2, 2, frames, 32, generator=g),
               "source_frames": torch.tensor([3, frames + 6], dtype=torch.int32)}
    tokens = torch.tensor([2, 17], dtype=torch.int32)
    state = {k: torch.from_numpy(v) for k, v in stage.initial_state(2).items()}
    with torch.inference_mode():
        is_pad = torch.tensor([0, 1], dtype=torch.int32)
        want, want_state = tiny_model.stage_step("mt_decoder")(
            {"x": tokens, "is_pad": is_pad, **context}, state)
    got, got_state = stage.run({"x": tokens.numpy(), "is_pad": is_pad.numpy()},
                               {k: v.numpy() for k, v in state.items()},
                               {k: v.numpy() for k, v in context.items()})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name].numpy())
    for name in want_state:
        np.testing.assert_array_equal(got_state[name], want_state[name].numpy())


def test_parity_command(tiny_artifacts_dir, capsys):
    rc = cli.main(["parity", str(tiny_artifacts_dir), "--stages", "mt_source", "duration", "--steps", "10"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "max abs" in out and "cosine" in out and "tolerance" in out and "verdict" in out
    assert out.count("PASS") == 4 and "FAIL" not in out  # mt_source x3 + duration x1
    assert "4/4 checks passed" in out


def test_parity_command_refuses_missing_precision(tiny_artifacts_dir, capsys):
    assert cli.main(["parity", str(tiny_artifacts_dir), "--precision", "fp16"]) == 2
    assert "fp16" in capsys.readouterr().err


@pytest.mark.slow
def test_echostream_preset_parity(echostream_artifacts_dir):
    """The full-size preset (exported once per session by the shared fixture): every check passes."""
    artifacts = load_artifacts(echostream_artifacts_dir)
    assert artifacts.stages == list(exported_stage_names(artifacts.config))
    results = run_parity(artifacts, "onnxruntime", steps=10)
    assert all(r.passed for r in results), format_table(results)


def test_reference_forward_keeps_the_streamspeech_contract(tiny_model, tiny_config):
    """``forward``: encoder_out [T, B, D] (T = S*N for 4SN + 4R fbank frames), both CTC heads."""
    S, R = tiny_config.encoder.segment_length, tiny_config.encoder.right_context
    features = torch.randn(2, 4 * S * 5 + 4 * R, 80, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = tiny_model(features, torch.tensor([features.shape[1], 40]))
    T, D = S * 5, tiny_config.encoder.d_model
    assert out["encoder_out"][0].shape == (T, 2, D)
    assert out["encoder_padding_mask"][0].shape == (2, T)
    assert out["encoder_padding_mask"][0][1].any() and not out["encoder_padding_mask"][0][0].any()
    for key, vocab in (("asr_log_probs", tiny_config.ctc.src_vocab_size),
                       ("st_log_probs", tiny_config.ctc.tgt_vocab_size)):
        assert out[key].shape == (T, 2, vocab)
        torch.testing.assert_close(out[key].exp().sum(-1), torch.ones(T, 2))
    with pytest.raises(ValueError, match="unknown stage 'decoder'"):
        tiny_model.stage_step("decoder")
