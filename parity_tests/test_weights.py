"""Checkpoints: seeded reproducible init, bitwise safetensors round trip, clear errors.

Written against a small stand-in model (the tiny Conformer encoder + a tied embedding/output pair +
a BatchNorm, so buffers, int64 counters and tied tensors are all covered); the last test runs the
same round trip on the real ``EchoStreamModel`` once it exists."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from echostream.config import EchoStreamConfig, get_preset
from echostream.models.conformer_encoder import ChunkConformerEncoder
from echostream.models.weights import build_model, load_checkpoint, load_weights, save_checkpoint


class StandIn(nn.Module):
    """Any model built from an EchoStreamConfig: ``factory(cfg) -> nn.Module``."""

    def __init__(self, cfg: EchoStreamConfig):
        super().__init__()
        self.encoder = ChunkConformerEncoder(cfg.encoder)
        self.embed = nn.Embedding(cfg.ctc.tgt_vocab_size, cfg.encoder.d_model)
        self.out = nn.Linear(cfg.encoder.d_model, cfg.ctc.tgt_vocab_size, bias=False)
        self.out.weight = self.embed.weight  # tied, as the MT decoder's embedding/output
        self.norm = nn.BatchNorm1d(cfg.encoder.d_model)


def stand_in_cfg(seed: int = 0, **encoder) -> EchoStreamConfig:
    cfg = get_preset("tiny")
    enc = dataclasses.replace(cfg.encoder, kind="conformer", subsampling="conv1d",
                              subsampling_channels=16, **encoder)
    return dataclasses.replace(cfg, encoder=enc, seed=seed)


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def assert_bitwise_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def trained_looking(model: nn.Module) -> nn.Module:
    """Move buffers off their init values so the round trip has to carry them."""
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.num_batches_tracked.fill_(123)
    return model


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = build_model(stand_in_cfg(seed=7), StandIn)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(stand_in_cfg(seed=7), StandIn)
    assert_bitwise_equal(a, b)
    c = build_model(stand_in_cfg(seed=8), StandIn)
    assert not torch.equal(a.encoder.linear.weight, c.encoder.linear.weight)
    assert not a.training


def test_build_is_identical_in_another_process():
    cfg = stand_in_cfg(seed=3)
    here = digest(build_model(cfg, StandIn))
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); torch.manual_seed(99);"
        "import test_weights as t; from echostream.models.weights import build_model;"
        "print(t.digest(build_model(t.stand_in_cfg(seed=3), t.StandIn)))"
    )
    there = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert there == here


@pytest.mark.parametrize("target", ["folder", "file"])
def test_round_trip_is_bitwise(tmp_path, target):
    cfg = stand_in_cfg(seed=5)
    model = trained_looking(build_model(cfg, StandIn))
    path = tmp_path / "ckpt" if target == "folder" else tmp_path / "ckpt" / "my.safetensors"
    weights = save_checkpoint(model, cfg, path)
    assert weights.is_file() and (weights.parent / "config.json").is_file()
    assert weights.name == ("weights.safetensors" if target == "folder" else "my.safetensors")
    loaded, loaded_cfg = load_checkpoint(path, StandIn)
    assert loaded_cfg == cfg
    assert_bitwise_equal(model, loaded)
    assert loaded.out.weight is loaded.embed.weight  # tying survives loading
    # The tied table is stored once.
    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    assert ("out.weight" in stored) != ("embed.weight" in stored)
    assert set(aliases) & {"out.weight", "embed.weight"}
    # A folder checkpoint can also be opened by its only *.safetensors file.
    loaded2, _ = load_checkpoint(weights, StandIn)
    assert_bitwise_equal(model, loaded2)


def test_load_weights_into_existing_model(tmp_path):
    cfg = stand_in_cfg(seed=5)
    model = trained_looking(build_model(cfg, StandIn))
    weights = save_checkpoint(model, cfg, tmp_path)
    other = build_model(stand_in_cfg(seed=6), StandIn)
    assert load_weights(other, weights) is other
    assert_bitwise_equal(model, other)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope", StandIn)
    cfg = stand_in_cfg()
    save_checkpoint(build_model(cfg, StandIn), cfg, tmp_path / "a")
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(ValueError, match="config not found"):
        load_checkpoint(tmp_path / "a", StandIn)
    (tmp_path / "b").mkdir()
    cfg.save(tmp_path / "b" / "config.json")
    with pytest.raises(ValueError, match=r"exactly one \*.safetensors, got \[\]"):
        load_checkpoint(tmp_path / "b", StandIn)
    with pytest.raises(ValueError, match="weights file not found"):
        load_weights(StandIn(cfg), tmp_path / "b" / "weights.safetensors")


def test_corrupt_weights_file(tmp_path):
    cfg = stand_in_cfg()
    weights = save_checkpoint(build_model(cfg, StandIn), cfg, tmp_path)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_checkpoint(tmp_path, StandIn)


def test_config_weights_mismatch_lists_keys(tmp_path):
    cfg = stand_in_cfg()
    save_checkpoint(build_model(cfg, StandIn), cfg, tmp_path)
    # More layers in config.json than in the file -> missing keys, named.
    stand_in_cfg(num_layers=3).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"missing: encoder\.conformer_layers\.2\.") as err:
        load_checkpoint(tmp_path, StandIn)
    assert "unexpected" not in str(err.value)
    # Fewer layers -> unexpected keys.
    stand_in_cfg(num_layers=1).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"unexpected: encoder\.conformer_layers\.1\."):
        load_checkpoint(tmp_path, StandIn)
    # Other widths -> shape mismatches with expected vs got.
    stand_in_cfg(ffn_dim=48).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"mismatched: .*ffn1\.w_1\.bias \(expected \[48\] "
                                         r"torch\.float32, got \[64\] torch\.float32\)"):
        load_checkpoint(tmp_path, StandIn)


def test_bad_config_json(tmp_path):
    cfg = stand_in_cfg()
    save_checkpoint(build_model(cfg, StandIn), cfg, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"encoder": {"no_such_field": 1}}))
    with pytest.raises(ValueError, match="no_such_field"):
        load_checkpoint(tmp_path, StandIn)


def test_echostream_model_round_trip(tmp_path):
    pytest.importorskip("echostream.models.echostream_model",
                        reason="models/echostream_model.py not written yet")
    cfg = get_preset("tiny")
    model = build_model(cfg)
    assert_bitwise_equal(model, build_model(cfg))
    save_checkpoint(model, cfg, tmp_path)
    loaded, loaded_cfg = load_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    assert_bitwise_equal(model, loaded)
