"""`echostream export` on the tiny preset: files, manifest, graphs, --force, and every way a damaged
artifacts folder or a bad feed is refused (ArtifactError / ValueError naming expected vs got)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from echostream import cli
from echostream.contract import ALL_STAGE_NAMES, BATCH, STAGE_NAMES, stage_contract
from echostream.errors import ArtifactError, BackendUnavailable, EchoStreamError
from echostream.export.manifest import add_files
from echostream.runtime.artifacts import FORMAT_NAME, FORMAT_VERSION, load_artifacts, sha256_file
from echostream.runtime.backends import load_stage
from echostream.runtime.onnxruntime_backend import OrtStage

EXPECTED_FILES = {f"{s}.onnx" for s in ALL_STAGE_NAMES} | {
    "config.json", "weights.safetensors", "src_dict.txt", "tgt_dict.txt", "gcmvn.npz"}


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


# ---- what an export writes ------------------------------------------------------------------------


def test_folder_holds_every_file_with_its_hash(tiny_artifacts_dir):
    root = tiny_artifacts_dir
    manifest = _manifest(root)
    on_disk = {p.name for p in root.iterdir() if p.name != "manifest.json"}
    assert on_disk == EXPECTED_FILES
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(root / name)
        assert entry["bytes"] == (root / name).stat().st_size
    assert manifest["format"] == FORMAT_NAME and manifest["format_version"] == FORMAT_VERSION
    assert json.loads((root / "config.json").read_text()) == manifest["config"]
    assert manifest["export"]["opset"] == 18
    for key in ("echostream", "torch", "onnx", "onnxruntime", "onnxscript", "python", "exporter", "opset"):
        assert manifest["versions"][key], key
    assert manifest["created"].endswith("Z")


def test_manifest_contracts_equal_the_shared_contract(tiny_artifacts_dir):
    manifest = _manifest(tiny_artifacts_dir)
    assert list(manifest["stages"]) == list(ALL_STAGE_NAMES)  # the fixture exports the sentence graphs
    for stage, entry in manifest["stages"].items():
        assert entry["contract"] == stage_contract(stage, manifest["config"]).to_dict()
        assert entry["files"] == {"fp32": f"{stage}.onnx"}
        assert entry["export_s"] > 0


@pytest.mark.parametrize("stage", STAGE_NAMES + ("unit_decoder_short",))
def test_graph_is_valid_and_matches_contract(tiny_artifacts_dir, tiny_config, stage):
    path = tiny_artifacts_dir / f"{stage}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 18
    assert not [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    contract = stage_contract(stage, tiny_config.to_dict())
    assert [i.name for i in model.graph.input] == contract.input_names
    assert [o.name for o in model.graph.output] == contract.output_names
    for value, spec in zip([*model.graph.input, *model.graph.output], [*contract.inputs, *contract.outputs]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == BATCH, value.name
        assert [d.dim_value for d in dims[1:]] == list(spec.shape[1:]), value.name
        assert onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name == spec.dtype
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    params = {d.dim_param for v in inferred.graph.value_info for d in v.type.tensor_type.shape.dim
              if d.HasField("dim_param")}
    assert params <= {BATCH}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["stage"] == stage
    assert json.loads(meta["config"]) == tiny_config.to_dict()
    assert int(meta["segment_length"]) == tiny_config.encoder.segment_length


def test_placeholder_vocabularies_and_cmvn(tiny_artifacts, tiny_config):
    for vocab, size in ((tiny_artifacts.src_vocab, tiny_config.ctc.src_vocab_size),
                        (tiny_artifacts.tgt_vocab, tiny_config.ctc.tgt_vocab_size)):
        assert len(vocab) == size and len(set(vocab)) == size
        assert vocab[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
        starts = [p for p in vocab[4:] if p.startswith("\u2581")]
        assert 0 < len(starts) < size - 4  # word starts and continuations both present
    assert tiny_artifacts.vocab_placeholder
    assert tiny_artifacts.manifest["vocab"]["placeholder"] is True
    np.testing.assert_array_equal(tiny_artifacts.cmvn_mean, np.zeros(80, np.float32))
    np.testing.assert_array_equal(tiny_artifacts.cmvn_std, np.ones(80, np.float32))


# ---- the command: --force, failures leave nothing behind -------------------------------------------


def test_export_command_force_and_no_partial_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "engines" / "tiny"
    args = ["export", "--preset", "tiny", "--out", str(out), "--stages", "mt_source", "--quiet"]
    assert cli.main(args) == 0
    manifest = _manifest(out)
    assert list(manifest["stages"]) == ["mt_source"]
    assert "placeholder" in capsys.readouterr().err

    assert cli.main(args) == 2  # non-empty folder without --force
    assert "--force" in capsys.readouterr().err
    assert _manifest(out)["created"] == manifest["created"]

    from echostream.export import onnx_export

    def failing(model, stage, path, **kw):
        raise onnx_export.ExportError(f"{stage}: torch.onnx.export failed: boom")

    monkeypatch.setattr(onnx_export, "export_stage", failing)
    assert cli.main(args + ["--force"]) == 2
    err = capsys.readouterr().err
    assert "mt_source" in err and "boom" in err and "Traceback" not in err
    assert _manifest(out) == manifest  # the old folder survives a failed --force export
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no partial folder left

    monkeypatch.undo()
    assert cli.main(args + ["--force"]) == 0
    assert _manifest(out)["created"] >= manifest["created"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_export_refuses_bad_requests(tmp_path, capsys):
    assert cli.main(["export", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_short_unit_graph_is_exported_only_when_the_config_has_one():
    from echostream.config import get_preset
    from echostream.contract import exported_stage_names
    from echostream.export.commands import _resolve_stages

    cfg = get_preset("tiny")
    assert exported_stage_names(cfg)[-1] == "unit_decoder_short"
    assert _resolve_stages(cfg, None, False) == list(STAGE_NAMES) + ["unit_decoder_short"]
    for off in (0, cfg.sentence.max_target_tokens):
        cfg.sentence.short_target_tokens = off
        assert exported_stage_names(cfg) == STAGE_NAMES
        with pytest.raises(EchoStreamError, match="unit_decoder_short: .*exports no short"):
            _resolve_stages(cfg, ["unit_decoder_short"], False)


# ---- damaged folders -----------------------------------------------------------------------------


def test_missing_folder_and_manifest(tmp_path, tiny_artifacts_copy):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifacts(tmp_path / "nowhere")
    (tiny_artifacts_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest is missing"):
        load_artifacts(tiny_artifacts_copy)


def test_corrupt_manifest_and_unsupported_version(tiny_artifacts_copy):
    root = tiny_artifacts_copy
    good = _manifest(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifacts(root)
    _write_manifest(root, {**good, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ArtifactError, match=rf"format_version {FORMAT_VERSION + 1}.*upgrade"):
        load_artifacts(root)
    _write_manifest(root, {**good, "format": "something-else"})
    with pytest.raises(ArtifactError, match="format expected"):
        load_artifacts(root)


def test_missing_file_and_hash_mismatch(tiny_artifacts_copy):
    root = tiny_artifacts_copy
    data = bytearray((root / "tgt_dict.txt").read_bytes())
    data[0:1] = b"X" if data[0:1] != b"X" else b"Y"  # same size, different content
    (root / "tgt_dict.txt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tgt_dict\.txt: sha256 expected"):
        load_artifacts(root)
    (root / "st_ctc.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"st_ctc\.onnx: listed in the manifest but missing"):
        load_artifacts(root)


def test_contract_mismatch_in_manifest(tiny_artifacts_copy):
    root = tiny_artifacts_copy
    manifest = _manifest(root)
    manifest["stages"]["encoder"]["contract"]["states"][1]["shape"][2] = 99  # left_keys slots
    _write_manifest(root, manifest)
    with pytest.raises(ArtifactError, match=r"encoder contract .*'left_keys' expected float32\['B', 2, 8, 32\], got float32\['B', 2, 99, 32\]"):
        load_artifacts(root)


def test_graph_that_does_not_match_the_config(tiny_artifacts_copy):
    """Config and manifest contract agree with each other but not with the ONNX graph."""
    root = tiny_artifacts_copy
    manifest = _manifest(root)
    manifest["config"]["encoder"]["left_context"] = 16
    for stage, entry in manifest["stages"].items():
        entry["contract"] = stage_contract(stage, manifest["config"]).to_dict()
    _write_manifest(root, manifest)
    artifacts = load_artifacts(root)
    with pytest.raises(ArtifactError, match=r"encoder\.onnx: encoder tensor 'left_keys' expected float32\['B', 2, 16, 32\], got float32\['B', 2, 8, 32\]"):
        OrtStage.from_artifacts(artifacts, "encoder")


def test_corrupt_onnx_is_named(tiny_artifacts_copy):
    root = tiny_artifacts_copy
    (root / "vocoder.onnx").write_bytes(b"\x08\x07garbage" * 100)
    add_files(root, ["vocoder.onnx"])  # re-hash: only the graph itself is broken
    artifacts = load_artifacts(root)
    with pytest.raises(ArtifactError, match=r"vocoder\.onnx: ONNX Runtime cannot load the vocoder graph"):
        load_stage(artifacts, "vocoder")


def test_missing_precision_and_backends(tiny_artifacts):
    with pytest.raises(ArtifactError, match="no stage has a fp16 graph"):
        load_artifacts(tiny_artifacts.root, precision="fp16")
    with pytest.raises(ValueError, match="unknown backend"):
        load_stage(tiny_artifacts, "encoder", backend="tflite")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            load_stage(tiny_artifacts, "encoder", device="cuda")
    # No plans were built for these artifacts (and usually no TensorRT here): a one-line user error.
    with pytest.raises(EchoStreamError, match="TensorRT|tensorrt"):
        load_stage(tiny_artifacts, "encoder", backend="tensorrt")


# ---- bad feeds -----------------------------------------------------------------------------------


def test_wrong_input_shape_dtype_and_names(tiny_artifacts):
    stage = load_stage(tiny_artifacts, "encoder", threads=1)
    state = stage.initial_state(2)
    good = np.zeros((2, 23, 80), np.float32)
    outputs, next_state = stage.run({"x": good}, state)
    assert outputs["y"].shape == (2, 4, 32) and next_state["processed_segments"].tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"encoder: x shape expected \[2, 23, 80\] \(B=2\), got \[2, 22, 80\]"):
        stage.run({"x": good[:, :22]}, state)
    with pytest.raises(ValueError, match="encoder: x dtype expected float32, got float64"):
        stage.run({"x": good.astype(np.float64)}, state)
    with pytest.raises(ValueError, match=r"memory shape expected \[2, 2, 2, 32\] \(B=2\), got \[1, 2, 2, 32\]"):
        stage.run({"x": good}, {**state, "memory": state["memory"][:1]})
    with pytest.raises(ValueError, match="processed_segments dtype expected int32, got int64"):
        stage.run({"x": good}, {**state, "processed_segments": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match="state names expected"):
        stage.run({"x": good}, {k: v for k, v in state.items() if k != "memory"})
    with pytest.raises(ValueError, match="inputs names expected"):
        stage.run({"features": good}, state)


def test_export_from_checkpoint_keeps_its_weights_vocab_and_cmvn(tmp_path, tiny_config, capsys):
    """`echostream export --checkpoint DIR`: the graphs compute with the checkpoint's weights (not a
    seeded init), and its dictionaries and CMVN statistics travel into the artifacts."""
    import torch

    from echostream.models.weights import build_model, save_checkpoint

    model = build_model(tiny_config)
    with torch.no_grad():  # make the weights differ from the preset's seeded init
        model.asr_ctc.proj.weight.mul_(-2.0)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model, tiny_config, ckpt)
    pieces = [f"▁w{i}" for i in range(tiny_config.ctc.src_vocab_size - 4)]
    for name in ("src_dict.txt", "tgt_dict.txt"):
        (ckpt / name).write_text("".join(f"{p} 1\n" for p in pieces), encoding="utf-8")
    mean, std = np.full(80, 0.5, np.float32), np.full(80, 2.0, np.float32)
    np.savez(ckpt / "gcmvn.npz", mean=mean, std=std)

    out = tmp_path / "art"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--quiet",
                     "--stages", "encoder"]) == 0, capsys.readouterr().err
    artifacts = load_artifacts(out)
    assert artifacts.vocab_placeholder is False
    np.testing.assert_array_equal(artifacts.cmvn_mean, mean)
    np.testing.assert_array_equal(artifacts.cmvn_std, std)
    assert (out / "src_dict.txt").read_text(encoding="utf-8") == (ckpt / "src_dict.txt").read_text(
        encoding="utf-8")

    # The exported encoder reproduces the checkpoint model, not the seeded preset.
    contract = artifacts.contract("encoder")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(contract.spec("x").concrete_shape(1), generator=gen)
    state = {s.name: np.zeros(s.concrete_shape(1), s.dtype) for s in contract.states}
    got, _ = OrtStage(out / "encoder.onnx", contract, deterministic=True).run({"x": x.numpy()}, state)
    with torch.no_grad():
        ref, _ = model.stage_step("encoder")({"x": x}, {k: torch.from_numpy(v) for k, v in state.items()})
        seeded, _ = build_model(tiny_config).stage_step("encoder")(
            {"x": x}, {k: torch.from_numpy(v) for k, v in state.items()})
    np.testing.assert_allclose(got["asr_log_probs"], ref["asr_log_probs"].numpy(), atol=1e-4)
    assert np.abs(got["asr_log_probs"] - seeded["asr_log_probs"].numpy()).max() > 1e-2


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_host_backends_never_write_into_their_inputs(tiny_artifacts, backend):
    """Why ``Stage.copy_state`` may be shallow on host backends: a state passed to ``run`` is
    unchanged afterwards, so a snapshot taken before a step stays valid for a rollback."""
    stage = load_stage(tiny_artifacts, "mt_decoder", backend)
    rng = np.random.default_rng(0)
    context = {s.name: (rng.integers(1, 9, s.concrete_shape(1)).astype(s.dtype) if s.dtype == "int32"
                        else rng.standard_normal(s.concrete_shape(1)).astype(s.dtype))
               for s in stage.contract.context}
    state = stage.initial_state(1)
    for token in (2, 5, 7):
        snapshot = stage.copy_state(state)
        before = {k: v.copy() for k, v in state.items()}
        _, state = stage.run({"x": np.array([token], np.int32), "is_pad": np.zeros(1, np.int32)},
                             state, context)
        for name, value in snapshot.items():
            np.testing.assert_array_equal(value, before[name], err_msg=f"{backend} wrote into {name}")
        assert int(state["target_positions"][0]) == int(before["target_positions"][0]) + 1
