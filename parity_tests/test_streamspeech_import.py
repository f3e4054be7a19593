"""``echostream import streamspeech`` on checkpoints written in fairseq's on-disk format.

The synthetic checkpoints are what fairseq's ``Trainer.state_dict`` + ``torch.save`` write, built
from a seeded ``streamspeech_tiny`` model: its state dict under StreamSpeech's key names (renamed
here, independently of the importer, from StreamSpeech's module structure), with the two tied
aliases (same memory, as ``nn.Module.state_dict`` saves a tied weight) and the two ``version``
buffers, inside ``{"args", "cfg", "model", "criterion", "optimizer_history", "task_state",
"extra_state", "last_optimizer_state"}``; ``cfg`` in the three forms fairseq checkpoints carry (a
pickled omegaconf ``DictConfig``, the plain dict of ``OmegaConf.to_container`` with an argparse
``Namespace`` as ``model``, and legacy ``args``). The vocoder is ``{"generator": state_dict}`` of a
generator put under ``torch.nn.utils.weight_norm`` (with its magnitudes perturbed, so removing
weight norm is not the identity).

The data folder is StreamSpeech's real fr-en folder (``../shared/streamspeech/configs/fr-en``:
trained dictionaries, SentencePiece models, CMVN). The tiny model's MT decoder FFN is 64 wide, so
the import tests use a copy of that folder whose multitask yaml says 64 (everything else is the real
file); the untouched folder is the "architecture field mismatch" case.

The full-size claim of the fidelity note (every tensor maps 1:1, 70,604,768 parameters) is checked
from shapes only, against a key table written here from StreamSpeech's module code.
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echostream import cli
from echostream.export.fairseq_checkpoint import CheckpointError
from echostream.config import get_preset
from echostream.models.weights import build_model, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "streamspeech"
FR_EN = SHARED / "configs" / "fr-en"
pytestmark = pytest.mark.filterwarnings(  # the test writes weight norm the way fairseq did
    "ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
needs_data = pytest.mark.skipif(not FR_EN.is_dir(), reason=f"StreamSpeech data folder {FR_EN} absent")

# ---- StreamSpeech's names (written from its code, not from the importer) ------------------------

_OURS_TO_STREAMSPEECH = (
    ("unit_decoder.t2u.", "synthesizer_encoder."), ("unit_decoder.", "decoder."),
    ("mt_decoder.", "target_unigram_decoder."), ("st_ctc.ctc.", "ctc_target_unigram_decoder."),
    ("asr_ctc.", "source_unigram_decoder."), ("encoder.", "encoder."),
)


def streamspeech_name(key: str) -> str:
    for ours, theirs in _OURS_TO_STREAMSPEECH:
        if key.startswith(ours):
            return re.sub(r"\.ffn\.fc([12])\.", r".fc\1.", theirs + key[len(ours):])
    raise KeyError(key)


def streamspeech_state(model, dtype=None) -> collections.OrderedDict:
    """The model's state dict as StreamSpeech's ``model.state_dict()`` would hold it."""
    state = collections.OrderedDict()
    for key, value in model.state_dict().items():
        if key.startswith("vocoder."):
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[streamspeech_name(key)] = value
    # fairseq decoders register a `version` buffer; tied weights appear under both names.
    state["target_unigram_decoder.version"] = torch.tensor([3.0])
    state["decoder.version"] = torch.tensor([3.0])
    state["target_unigram_decoder.output_projection.weight"] = state["target_unigram_decoder.embed_tokens.weight"]
    state["decoder.embed_tokens.weight"] = state["decoder.output_projection.weight"]
    # nn.Module.state_dict() carries per-module versions as an attribute, pickled with the dict.
    state._metadata = collections.OrderedDict(
        (prefix, {"version": 1}) for prefix in ("", "encoder", "decoder", "target_unigram_decoder"))
    return state


def model_args(cfg, **overrides) -> dict:
    """The training script's settings (``train.simul-s2st.sh``) at the model's dims."""
    e, m, u = cfg.encoder, cfg.mt, cfg.unit
    args = dict(
        arch="streamspeech", encoder_layers=e.num_layers, encoder_embed_dim=e.d_model,
        encoder_ffn_embed_dim=e.ffn_dim, encoder_attention_heads=e.num_heads,
        depthwise_conv_kernel_size=e.depthwise_kernel, conv_channels=e.subsampling_channels,
        conv_kernel_sizes="5,5", conv_version="s2t_transformer", conv_out_channels=256,
        attn_type="espnet", pos_enc_type="rel_pos", chunk_size=8, multichunk=True, uni_encoder=True,
        translation_decoder_layers=m.num_layers, synthesizer_encoder_layers=u.t2u_layers,
        decoder_layers=u.num_layers, decoder_embed_dim=u.d_model, decoder_ffn_embed_dim=u.ffn_dim,
        decoder_attention_heads=u.num_heads, ctc_upsample_rate=u.upsample, k1=0, k2=0, n1=1, n2=-1,
        share_decoder_input_output_embed=True, n_frames_per_step=1, input_feat_per_channel=80,
        input_channels=1, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
        activation_fn="relu", decoder_normalize_before=True, encoder_normalize_before=True,
        no_scale_embedding=False, max_source_positions=6000, max_target_positions=1200,
        synthesizer="transformer", synthesizer_augmented_cross_attention=False,
        target_speaker_embed=False, encoder_freezing_updates=0, fp16=True,
    )
    args.update(overrides)
    return args


TASK = dict(_name="speech_to_speech_ctc", data="/data/zhangshaolei/datasets/cvss/cvss-c/fr-en/fbank2unit",
            config_yaml="config_gcmvn.yaml", multitask_config_yaml="config_mtl_asr_st_ctcst.yaml",
            target_is_code=True, target_code_size=1000, n_frames_per_step=1, vocoder="code_hifigan")


def fairseq_checkpoint(state, args: dict, form: str) -> dict:
    """What fairseq's ``Trainer.state_dict`` saves, with ``cfg`` in one of its three forms."""
    from omegaconf import OmegaConf

    common = {"fp16": True, "seed": 1, "log_format": "json"}
    if form == "omegaconf":  # a pickled DictConfig (the model settings as a config node)
        cfg = OmegaConf.create({"_name": None, "common": common, "model": args, "task": TASK,
                                "criterion": {"_name": "speech_to_unit_2pass_ctc_asr_st"}})
        top = {"args": None, "cfg": cfg}
    elif form == "dict":  # OmegaConf.to_container(cfg): a dict whose `model` is a Namespace
        top = {"args": None, "cfg": {"_name": None, "common": common, "model": argparse.Namespace(**args),
                                     "task": dict(TASK)}}
    elif form == "args":  # legacy: one Namespace with model and task settings
        top = {"args": argparse.Namespace(**{**{k: v for k, v in TASK.items() if k != "_name"}, **args})}
    else:
        raise ValueError(form)
    first = next(iter(state.values()))
    top.update(
        model=state, criterion=None,
        optimizer_history=[{"criterion_name": "SpeechToUnit2passCTCASRSTMultitaskTaskCriterion",
                            "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 3.2},
                            "num_updates": 1000}],
        task_state={},
        extra_state={"metrics": {}, "previous_training_time": 12.5,
                     "train_iterator": {"epoch": 2, "iterations_in_epoch": 0, "shuffle": True}},
        last_optimizer_state={"state": {0: {"exp_avg": torch.zeros_like(first, dtype=torch.float32)}},
                              "param_groups": [{"lr": 0.001, "params": [0]}]},
    )
    return top


# ---- the vocoder ------------------------------------------------------------------------------------


def generator_convs(vocoder):
    """The convs fairseq's ``Generator`` keeps under weight norm."""
    convs = [vocoder.conv_pre, *vocoder.ups, vocoder.conv_post]
    for block in vocoder.resblocks:
        convs += [*block.convs1, *block.convs2]
    return convs


def weight_normed_generator(vocoder, seed: int = 5):
    """-> (``{"generator": state}`` with weight_g/weight_v, the weights after removing it)."""
    normed = copy.deepcopy(vocoder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in generator_convs(normed):
            torch.nn.utils.weight_norm(conv)
            conv.weight_g.mul_(0.5 + torch.rand(conv.weight_g.shape, generator=gen))
    saved = {"generator": collections.OrderedDict(normed.state_dict())}
    for conv in generator_convs(normed):
        torch.nn.utils.remove_weight_norm(conv)
    return saved, {f"vocoder.{k}": v for k, v in normed.state_dict().items()}


def vocoder_json(vcfg) -> dict:
    """The vocoder's config.json, in fairseq's field names."""
    return {"resblock": "1", "upsample_rates": vcfg.upsample_rates,
            "upsample_kernel_sizes": vcfg.upsample_kernel_sizes,
            "upsample_initial_channel": vcfg.upsample_initial_channel,
            "resblock_kernel_sizes": vcfg.resblock_kernel_sizes,
            "resblock_dilation_sizes": vcfg.resblock_dilation_sizes,
            "num_embeddings": vcfg.num_units, "embedding_dim": vcfg.embedding_dim,
            "model_in_dim": vcfg.embedding_dim, "segment_size": 8960, "code_hop_size": 320,
            "f0": False, "sampling_rate": 16000, "dur_prediction_weight": 1.0,
            "dur_predictor_params": {"encoder_embed_dim": vcfg.embedding_dim,
                                     "var_pred_hidden_dim": vcfg.duration_hidden,
                                     "var_pred_kernel_size": vcfg.duration_kernel,
                                     "var_pred_dropout": 0.5}}


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_model():
    """A seeded streamspeech_tiny model with every buffer randomised too (BatchNorm statistics)."""
    model = build_model(get_preset("streamspeech_tiny"))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
            elif name.endswith("num_batches_tracked"):
                buf.fill_(1234)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory, source_model):
    """The synthetic checkpoints (three cfg forms, one of them fp16), the weight-normed vocoder,
    its config.json and a tiny-dims copy of the real fr-en data folder."""
    if not FR_EN.is_dir():
        pytest.skip(f"StreamSpeech data folder {FR_EN} absent")
    root = tmp_path_factory.mktemp("streamspeech")
    cfg = source_model.cfg
    out = {}
    for form, dtype in (("omegaconf", None), ("dict", torch.float16), ("args", None)):
        path = root / f"streamspeech.{form}.pt"
        torch.save(fairseq_checkpoint(streamspeech_state(source_model, dtype), model_args(cfg), form), path)
        out[form] = path
    generator, removed = weight_normed_generator(source_model.vocoder)
    torch.save(generator, root / "g_00500000")
    (root / "config.json").write_text(json.dumps(vocoder_json(cfg.vocoder), indent=2))
    data = root / "fr-en"
    shutil.copytree(FR_EN, data)
    mtl = data / "config_mtl_asr_st_ctcst.yaml"
    mtl.write_text(mtl.read_text().replace("decoder_ffn_embed_dim: 2048", f"decoder_ffn_embed_dim: {cfg.mt.ffn_dim}"))
    out.update(vocoder=root / "g_00500000", vocoder_config=root / "config.json", data=data,
               removed=removed, root=root)
    return out


def run_import(files, form: str, out: Path, *extra: str) -> int:
    return cli.main(["import", "streamspeech", str(files[form]), "--data", str(files["data"]),
                     "--vocoder", str(files["vocoder"]), "--vocoder-config", str(files["vocoder_config"]),
                     "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def imported(files, tmp_path_factory):
    """form -> the imported checkpoint folder."""
    out = {}
    for form in ("omegaconf", "dict", "args"):
        folder = tmp_path_factory.mktemp("imported") / form
        assert run_import(files, form, folder) == 0
        out[form] = folder
    return out


# ---- import: weights and config ---------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("form", ["omegaconf", "dict", "args"])
def test_import_gives_the_source_tensors(form, imported, source_model, files):
    model, cfg = load_checkpoint(imported[form])
    got, want = model.state_dict(), source_model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        if key.startswith("vocoder."):
            continue
        expect = value.half().float() if form == "dict" and value.is_floating_point() else value
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], expect), key
    # The vocoder: weight norm removed exactly as torch.nn.utils.remove_weight_norm does.
    for key, value in files["removed"].items():
        assert torch.allclose(got[key], value, rtol=0, atol=1e-6), key
    assert got["encoder.conformer_layers.0.conv_module.batch_norm.num_batches_tracked"].item() == 1234
    # ... and it is not the identity (the magnitudes were perturbed): the check can fail.
    conv = "vocoder.conv_pre.weight"
    assert (got[conv] - source_model.state_dict()[conv]).abs().max() > 1e-3


@needs_data
def test_imported_config_matches_the_source(imported, source_model):
    _, cfg = load_checkpoint(imported["omegaconf"])
    src, preset = source_model.cfg, get_preset("streamspeech")
    for section in ("features", "encoder", "ctc", "mt", "unit"):
        assert getattr(cfg, section) == getattr(src, section), section
    windows = ("window_left", "window_chunk", "window_right", "duration_window")
    arch = {f.name for f in dataclasses.fields(cfg.vocoder)} - set(windows)
    assert {k: getattr(cfg.vocoder, k) for k in arch} == {k: getattr(src.vocoder, k) for k in arch}
    assert {k: getattr(cfg.vocoder, k) for k in windows} == {k: getattr(preset.vocoder, k) for k in windows}
    assert cfg.sentence == preset.sentence  # the capacity stays the preset's default


@needs_data
def test_imported_folder_carries_the_data_files_and_their_origin(imported, files):
    folder = imported["args"]
    data = files["data"]
    pairs = {"src_dict.txt": data / "src_unigram6000/spm_unigram_fr.txt",
             "tgt_dict.txt": data / "tgt_unigram6000/spm_unigram_fr.txt",
             "gcmvn.npz": data / "gcmvn.npz",
             "src_spm.model": data / "src_unigram6000/spm_unigram_fr.model",
             "tgt_spm.model": data / "tgt_unigram6000/spm_unigram_fr.model"}
    record = json.loads((folder / "import.json").read_text())
    for name, source in pairs.items():
        assert (folder / name).read_bytes() == source.read_bytes(), name
        assert record["data"]["files"][name]["from"] == str(source.resolve())
    assert record["source"]["cfg"] == "args"
    assert record["vocoder"]["weight_norm"] == "removed"
    assert sorted(record["extra_keys_dropped"]) == sorted([
        "decoder.embed_tokens.weight", "decoder.version",
        "target_unigram_decoder.output_projection.weight", "target_unigram_decoder.version"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "weights.safetensors", "import.json", *pairs])


# ---- import -> export -> ORT parity ------------------------------------------------------------------


@needs_data
def test_import_export_lint_parity_translate_with_real_vocabularies(imported, tmp_path, capsys):
    """What a StreamSpeech user runs: the imported folder exports every stage (the chunk Conformer
    encoder included), lints clean, every stage passes ORT parity, the real fr-en dictionaries and
    CMVN reach the artifacts, and ``translate`` on the Common Voice clips (incremental, and exact:
    StreamSpeech's agent) prints text made of the real SentencePiece pieces (random weights: real
    pieces, not a real translation)."""
    import sentencepiece

    from echostream.contract import ALL_STAGE_NAMES
    from echostream.export.parity import run_parity
    from echostream.runtime.artifacts import load_artifacts
    from echostream.runtime.vocab import Vocabulary

    out = tmp_path / "engines"
    assert cli.main(["export", "--checkpoint", str(imported["omegaconf"]), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    artifacts = load_artifacts(out)
    assert artifacts.stages == list(ALL_STAGE_NAMES)  # the sentence graphs: a chunk Conformer default
    assert cli.main(["lint", str(out)]) == 0, capsys.readouterr().out
    results = run_parity(artifacts, "onnxruntime", steps=10)
    failed = [f"{r.stage}/{r.check}: {r.max_abs:.2e}" for r in results if not r.passed]
    assert not failed, failed
    assert {r.stage for r in results} == set(artifacts.stages)
    # Real vocabularies and statistics, not placeholders.
    assert artifacts.manifest["vocab"]["placeholder"] is False
    assert artifacts.manifest["cmvn"]["placeholder"] is False
    with np.load(FR_EN / "gcmvn.npz") as stats:
        assert np.array_equal(artifacts.cmvn_mean, stats["mean"].astype(np.float32))
    src = Vocabulary.from_artifacts_info(out, artifacts.manifest["vocab"]["src"])
    tgt = Vocabulary.from_artifacts_info(out, artifacts.manifest["vocab"]["tgt"])
    assert [tgt.piece(i) for i in (4, 5, 6)] == ["\u2581the", "s", "\u2581of"]
    assert [src.piece(i) for i in (4, 5, 6)] == ["s", "\u2581de", "\u2581la"]
    # translate the real French clips (48 kHz MP3) and read the report
    sp = {side: sentencepiece.SentencePieceProcessor(model_file=str(imported["omegaconf"] / f"{side}_spm.model"))
          for side in ("src", "tgt")}
    clips = sorted((SHARED / "example" / "wavs").glob("*.mp3"))
    runs = [(clip, "incremental") for clip in clips] + [(clips[0], "exact")]  # the agent, call for call
    for clip, fidelity in runs:
        report = tmp_path / f"{clip.stem}-{fidelity}.json"
        assert cli.main(["translate", str(clip), "--artifacts", str(out), "--json", str(report),
                         "--fidelity", fidelity]) == 0
        printed = capsys.readouterr().out
        doc = json.loads(report.read_text())
        asr_ids = [t for e in doc["events"] if e["type"] == "asr" for t in e["token_ids"]]
        tgt_ids = [t for e in doc["events"] if e["type"] == "translation" for t in e["token_ids"]]
        assert asr_ids and tgt_ids, "random weights still emit tokens on real speech"
        # The text is SentencePiece's own detokenisation of the ids, and it is what was printed.
        assert doc["asr_text"] == sp["src"].decode(asr_ids) == src.decode(asr_ids)
        assert doc["translation_text"] == sp["tgt"].decode(tgt_ids) == tgt.decode(tgt_ids)
        assert f"asr:         {doc['asr_text']}" in printed
        pieces = "\u2581" + doc["asr_text"].replace(" ", "\u2581")
        assert all(src.piece(i) in pieces for i in asr_ids if not src.is_special(i))


@needs_data
def test_runtime_text_is_the_sentencepiece_detokenisation(imported):
    """fairseq dictionary ids are the SentencePiece ids (specials 0-3 first), so the runtime's
    pieces joined as words give what SentencePiece decodes: the original sentences."""
    import sentencepiece

    from echostream.runtime.vocab import Vocabulary

    folder = imported["dict"]
    for side, text_file in (("src", "source.txt"), ("tgt", "target.txt")):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / f"{side}_spm.model"))
        vocab = Vocabulary.load(folder / f"{side}_dict.txt")
        assert vocab.size == sp.get_piece_size() == 6000
        for sentence in (SHARED / "example" / text_file).read_text().splitlines():
            ids = sp.encode(sentence)
            assert vocab.decode(ids) == sp.decode(ids) == sentence, sentence


# ---- bad input: one line naming the file / key / field, expected and got; exit 2; nothing written --


ERROR = "echostream import: error: "


def refused(capsys, argv: list[str], out: Path, *fragments: str) -> str:
    """Run the CLI; assert exit 2, one stderr line with every fragment, no output left behind."""
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(ERROR), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err[0]


def import_argv(ckpt: Path, files, out: Path, data: Path | None = None, vocoder: bool = True) -> list[str]:
    argv = ["import", "streamspeech", str(ckpt), "--data", str(data or files["data"]), "--out", str(out),
            "--quiet"]
    if vocoder:
        argv += ["--vocoder", str(files["vocoder"]), "--vocoder-config", str(files["vocoder_config"])]
    return argv


def write_variant(path: Path, model, *, edit=None, form: str = "dict", **arg_overrides) -> Path:
    """A synthetic checkpoint with its state dict edited (``edit(state)``) or its args changed."""
    state = streamspeech_state(model)
    if edit is not None:
        edit(state)
    torch.save(fairseq_checkpoint(state, model_args(model.cfg, **arg_overrides), form), path)
    return path


@needs_data
def test_refuses_a_file_that_is_not_a_fairseq_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "out"
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    refused(capsys, import_argv(text, files, out), out, str(text), "not a zip archive")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": {"a": torch.ones(2)}}, plain)
    refused(capsys, import_argv(plain, files, out), out, str(plain), "no 'model' state dict")
    bare = tmp_path / "bare.pt"
    torch.save({"model": {"a": torch.ones(2)}}, bare)
    refused(capsys, import_argv(bare, files, out), out, str(bare), "no 'cfg' or 'args'")


@needs_data
def test_refuses_a_truncated_or_corrupt_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "out"
    data = files["args"].read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(data[: len(data) // 2])
    refused(capsys, import_argv(cut, files, out), out, str(cut), "truncated")
    # One flipped byte inside a stored tensor: the zip's CRC catches it when that tensor is read.
    import zipfile

    with zipfile.ZipFile(files["args"]) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest storage record
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    flipped = bytearray(data)
    flipped[offset] ^= 0xFF
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(bytes(flipped))
    refused(capsys, import_argv(bad, files, out), out, str(bad), "corrupt", info.filename)


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


@needs_data
@pytest.mark.parametrize("payload, name", [(_SystemPayload, f"{os.system.__module__}.system"),
                                           (_EvalPayload, "builtins.eval")])
def test_refuses_a_pickle_that_would_run_code(payload, name, files, source_model, tmp_path, capsys):
    """The pickle asks for os.system / builtins.eval: refused by name, and the payload never runs
    (its marker file is not created). The same file through plain pickle does create it."""
    marker = tmp_path / "payload-ran"
    top = fairseq_checkpoint(streamspeech_state(source_model), model_args(source_model.cfg), "dict")
    top["extra_state"]["hook"] = payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save(top, evil)
    out = tmp_path / "out"
    refused(capsys, import_argv(evil, files, out), out, str(evil), f"refusing to load {name}")
    assert not marker.exists()
    # The payload is real: an unrestricted unpickler runs it (in a separate interpreter).
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(evil)], check=False, capture_output=True, timeout=120)
    assert marker.exists()


@needs_data
def test_refuses_a_missing_key(files, source_model, tmp_path, capsys):
    key = "encoder.conformer_layers.1.conv_module.batch_norm.running_var"
    ckpt = write_variant(tmp_path / "missing.pt", source_model, edit=lambda s: s.pop(key))
    out = tmp_path / "out"
    refused(capsys, import_argv(ckpt, files, out), out, str(ckpt), f"missing key {key}",
            "expected shape [32]")


@needs_data
def test_refuses_a_misshaped_key(files, source_model, tmp_path, capsys):
    key = "decoder.layers.1.fc2.weight"
    ckpt = write_variant(tmp_path / "misshaped.pt", source_model,
                         edit=lambda s: s.__setitem__(key, torch.zeros(32, 63)))
    out = tmp_path / "out"
    refused(capsys, import_argv(ckpt, files, out), out, str(ckpt), f"misshaped key {key}",
            "expected [32, 64], got [32, 63]")


@needs_data
def test_refuses_an_unexpected_key(files, source_model, tmp_path, capsys):
    ckpt = write_variant(tmp_path / "extra.pt", source_model,
                         edit=lambda s: s.__setitem__("encoder.spk_emb_proj.weight", torch.zeros(32, 64)))
    out = tmp_path / "out"
    refused(capsys, import_argv(ckpt, files, out), out, str(ckpt), "unexpected key encoder.spk_emb_proj.weight")


@needs_data
def test_refuses_an_untied_alias(files, source_model, tmp_path, capsys):
    alias = "decoder.embed_tokens.weight"
    ckpt = write_variant(tmp_path / "untied.pt", source_model,
                         edit=lambda s: s.__setitem__(alias, torch.randn(s[alias].shape)))
    out = tmp_path / "out"
    refused(capsys, import_argv(ckpt, files, out), out, str(ckpt), f"tied alias {alias}",
            "decoder.output_projection.weight", "different values")


@needs_data
def test_refuses_dictionaries_that_do_not_fit_the_output_layer(files, source_model, tmp_path, capsys):
    data = tmp_path / "fr-en"
    shutil.copytree(files["data"], data)
    src = data / "src_unigram6000" / "spm_unigram_fr.txt"
    src.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:-100]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    refused(capsys, import_argv(files["args"], files, out, data=data), out, str(src),
            "dictionary size expected 6000", "source_unigram_decoder.proj.weight", "got 5900")


@needs_data
@pytest.mark.parametrize("override, fragments", [
    ({"encoder_layers": 3}, ["field encoder_layers expected 3 (model args), got 2", "encoder.conformer_layers.*"]),
    ({"decoder_embed_dim": 48}, ["field decoder_embed_dim expected 48 (model args), got 32"]),
    ({"uni_encoder": False}, ["field uni_encoder expected True", "got False"]),
    ({"chunk_size": 999999}, ["field chunk_size expected '1..998'", "got 999999"]),
    ({"conv_version": "convtransformer"}, ["field conv_version expected 's2t_transformer'", "got 'convtransformer'"]),
    ({"encoder_attention_heads": 4}, ["field encoder_attention_heads expected 4 (model args), got 2",
                                      "encoder.conformer_layers.0.self_attn.pos_bias_u"]),
    ({"decoder_attention_heads": 3}, ["field decoder_attention_heads expected 'a divisor of decoder_embed_dim 32'",
                                      "got 3"]),
    ({"ctc_upsample_rate": 0}, ["field ctc_upsample_rate expected 'a positive int'", "got 0"]),
])
def test_refuses_an_architecture_field_mismatch(override, fragments, files, source_model, tmp_path, capsys):
    ckpt = write_variant(tmp_path / "arch.pt", source_model, form="omegaconf", **override)
    out = tmp_path / "out"
    refused(capsys, import_argv(ckpt, files, out), out, str(ckpt), *fragments)


@needs_data
def test_refuses_a_data_folder_built_for_other_dims(files, tmp_path, capsys):
    """The real fr-en folder's multitask yaml builds a 2048-wide MT FFN; the tiny model has 64."""
    out = tmp_path / "out"
    refused(capsys, import_argv(files["args"], files, out, data=FR_EN), out,
            "config_mtl_asr_st_ctcst.yaml", "field target_unigram.decoder_args.decoder_ffn_embed_dim expected 2048, got 64")


@needs_data
def test_refuses_a_vocoder_config_that_does_not_fit_its_weights(files, tmp_path, capsys):
    config = json.loads(files["vocoder_config"].read_text())
    config["upsample_initial_channel"] = 64
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = import_argv(files["args"], files, out, vocoder=False)
    argv += ["--vocoder", str(files["vocoder"]), "--vocoder-config", str(bad)]
    refused(capsys, argv, out, str(bad), "upsample_initial_channel expected 32", "got 64")
    config["f0"] = True
    bad.write_text(json.dumps(config))
    refused(capsys, argv, out, str(bad), "field f0 expected None", "got True")
    config.update(f0=False, upsample_initial_channel=32, num_embeddings=999)
    bad.write_text(json.dumps(config))
    refused(capsys, argv, out, str(bad), "field num_embeddings expected 1000", "got 999")


@needs_data
def test_existing_output_needs_force_and_a_failed_import_never_touches_it(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    rc = cli.main(import_argv(files["args"], files, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "exists and is not empty; pass --force" in err[0], err
    # A failing import with --force leaves the existing folder as it was.
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    assert cli.main(import_argv(bad, files, out) + ["--force"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # With --force a good import replaces it.
    assert cli.main(import_argv(files["args"], files, out) + ["--force"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imported streamspeech.args.pt -> ")
    assert not (out / "keep.txt").exists() and (out / "weights.safetensors").is_file()


@needs_data
def test_without_a_vocoder_the_vocoder_is_seeded_and_said_to_be_noise(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(import_argv(files["args"], files, out, vocoder=False)) == 0
    captured = capsys.readouterr()
    assert "no --vocoder given" in captured.err and "noise" in captured.err
    model, cfg = load_checkpoint(out)
    assert cfg.vocoder == get_preset("streamspeech").vocoder  # the released vocoder's dims
    seeded = build_model(cfg).vocoder.state_dict()
    assert all(torch.equal(v, seeded[k]) for k, v in model.vocoder.state_dict().items())
    assert json.loads((out / "import.json").read_text())["vocoder"] == {"seeded": True, "seed": cfg.seed}
    argv = import_argv(files["args"], files, tmp_path / "out2", vocoder=False) + ["--vocoder", str(files["vocoder"])]
    refused(capsys, argv, tmp_path / "out2", "--vocoder and --vocoder-config go together")


# ---- the full-size claim, from shapes only -----------------------------------------------------------

RELEASED_PARAMETERS = 70_604_768  # reference/streamspeech-fidelity.md, "Parameter mapping"
RELEASED_ARGS = model_args(get_preset("streamspeech"), encoder_layers=12, translation_decoder_layers=4,
                           synthesizer_encoder_layers=2, decoder_layers=2, decoder_embed_dim=512,
                           decoder_ffn_embed_dim=2048, decoder_attention_heads=8, ctc_upsample_rate=25)


def _linear(prefix: str, out: int, inp: int, bias: bool = True) -> dict:
    table = {f"{prefix}.weight": (out, inp)}
    if bias:
        table[f"{prefix}.bias"] = (out,)
    return table


def _norm(prefix: str, dim: int) -> dict:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _fairseq_layer(prefix: str, d: int, ffn: int, cross_kdim: int | None) -> dict:
    """fairseq TransformerEncoderLayer / TransformerDecoderLayer (ctc_unity/modules/transformer_layer.py)."""
    table = {}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        table |= _linear(f"{prefix}.self_attn.{proj}", d, d)
    table |= _norm(f"{prefix}.self_attn_layer_norm", d)
    if cross_kdim is not None:
        for proj, inp in (("k_proj", cross_kdim), ("v_proj", cross_kdim), ("q_proj", d), ("out_proj", d)):
            table |= _linear(f"{prefix}.encoder_attn.{proj}", d, inp)
        table |= _norm(f"{prefix}.encoder_attn_layer_norm", d)
    table |= _linear(f"{prefix}.fc1", ffn, d) | _linear(f"{prefix}.fc2", d, ffn)
    return table | _norm(f"{prefix}.final_layer_norm", d)


def _conformer_layer(prefix: str, d: int, ffn: int, heads: int, kernel: int) -> dict:
    """chunk_unity/modules/conformer_layer.py ChunkConformerEncoderLayer with ESPnet rel-pos MHA."""
    table = {}
    for ffn_name in ("ffn1", "ffn2"):
        table |= _norm(f"{prefix}.{ffn_name}.layer_norm", d)
        table |= _linear(f"{prefix}.{ffn_name}.w_1", ffn, d) | _linear(f"{prefix}.{ffn_name}.w_2", d, ffn)
    table |= _norm(f"{prefix}.self_attn_layer_norm", d)
    for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
        table |= _linear(f"{prefix}.self_attn.{proj}", d, d)
    table |= _linear(f"{prefix}.self_attn.linear_pos", d, d, bias=False)
    table |= {f"{prefix}.self_attn.pos_bias_u": (heads, d // heads),
              f"{prefix}.self_attn.pos_bias_v": (heads, d // heads)}
    conv = f"{prefix}.conv_module"
    table |= _norm(f"{conv}.layer_norm", d) | {
        f"{conv}.pointwise_conv1.weight": (2 * d, d, 1), f"{conv}.depthwise_conv.weight": (d, 1, kernel),
        f"{conv}.pointwise_conv2.weight": (d, d, 1), f"{conv}.batch_norm.running_mean": (d,),
        f"{conv}.batch_norm.running_var": (d,), f"{conv}.batch_norm.num_batches_tracked": ()}
    table |= _norm(f"{conv}.batch_norm", d)
    return table | _norm(f"{prefix}.final_layer_norm", d)


def released_streamspeech_shapes() -> dict:
    """Key -> shape of the released simultaneous model's state dict, written from StreamSpeech's
    module code (streamspeech_model.py, s2t_conformer.py, convolution.py, ctc_decoder.py,
    transformer_decoder.py, transformer_encoder.py, ctc_transformer_unit_decoder.py)."""
    d, ffn, vocab, units, dd = 256, 2048, 6000, 1005, 512
    table = {"encoder.subsample.conv_layers.0.weight": (1024, 80, 5), "encoder.subsample.conv_layers.0.bias": (1024,),
             "encoder.subsample.conv_layers.1.weight": (2 * d, 512, 5), "encoder.subsample.conv_layers.1.bias": (2 * d,)}
    table |= _linear("encoder.linear", d, d)
    for i in range(12):
        table |= _conformer_layer(f"encoder.conformer_layers.{i}", d, ffn, 4, 31)
    table |= _linear("source_unigram_decoder.proj", vocab, d) | _linear("ctc_target_unigram_decoder.proj", vocab, d)
    table |= {"target_unigram_decoder.version": (1,), "target_unigram_decoder.embed_tokens.weight": (vocab, dd),
              "target_unigram_decoder.output_projection.weight": (vocab, dd)}
    for i in range(4):
        table |= _fairseq_layer(f"target_unigram_decoder.layers.{i}", dd, 2048, cross_kdim=d)
    table |= _norm("target_unigram_decoder.layer_norm", dd)
    for i in range(2):
        table |= _fairseq_layer(f"synthesizer_encoder.layers.{i}", dd, 2048, cross_kdim=None)
    table |= _norm("synthesizer_encoder.layer_norm", dd)
    table |= {"decoder.version": (1,), "decoder.embed_tokens.weight": (units, dd),
              "decoder.output_projection.weight": (units, dd)}
    for i in range(2):
        table |= _fairseq_layer(f"decoder.layers.{i}", dd, 2048, cross_kdim=dd)
    return table | _norm("decoder.layer_norm", dd)


def released_generator_shapes() -> dict:
    """The unit HiFi-GAN ``g_00500000`` generator (fairseq hifigan.py + codehifigan.py), weight-normed."""
    vc = get_preset("streamspeech").vocoder

    def wn(prefix, shape):
        return {f"{prefix}.weight_g": (shape[0],) + (1,) * (len(shape) - 1), f"{prefix}.weight_v": shape}

    ch = vc.upsample_initial_channel
    table = wn("conv_pre", (ch, vc.embedding_dim, 7)) | {"conv_pre.bias": (ch,)}
    for i, (u, k) in enumerate(zip(vc.upsample_rates, vc.upsample_kernel_sizes)):
        table |= wn(f"ups.{i}", (ch >> i, ch >> (i + 1), k)) | {f"ups.{i}.bias": (ch >> (i + 1),)}
    block = 0
    for i in range(len(vc.upsample_rates)):
        c = ch >> (i + 1)
        for k, dils in zip(vc.resblock_kernel_sizes, vc.resblock_dilation_sizes):
            for j in range(len(dils)):
                for convs in ("convs1", "convs2"):
                    table |= wn(f"resblocks.{block}.{convs}.{j}", (c, c, k)) | {f"resblocks.{block}.{convs}.{j}.bias": (c,)}
            block += 1
    c = ch >> len(vc.upsample_rates)
    table |= wn("conv_post", (1, c, 7)) | {"conv_post.bias": (1,), "dict.weight": (vc.num_units, vc.embedding_dim)}
    e, h = vc.embedding_dim, vc.duration_hidden
    table |= {"dur_predictor.conv1.0.weight": (h, e, 3), "dur_predictor.conv1.0.bias": (h,),
              "dur_predictor.conv2.0.weight": (h, h, 3), "dur_predictor.conv2.0.bias": (h,),
              "dur_predictor.proj.weight": (1, h), "dur_predictor.proj.bias": (1,)}
    return table | _norm("dur_predictor.ln1", h) | _norm("dur_predictor.ln2", h)


def _params(shapes) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var",
                                                                          "num_batches_tracked", "version")))


@needs_data
def test_released_model_maps_one_to_one_with_70_6_million_parameters():
    """Shapes only (a meta-device model on our side): every tensor of the released checkpoint maps
    onto the ``streamspeech`` preset, and both sides hold 70,604,768 parameters."""
    from echostream.export.fairseq_checkpoint import FairseqCheckpoint
    from echostream.export.streamspeech_data import read_data_folder
    from echostream.export.streamspeech_import import derive_config, expected_tensors, plan_mapping

    shapes = released_streamspeech_shapes()
    ckpt = FairseqCheckpoint(Path("streamspeech.simultaneous.fr-en.pt"), {}, RELEASED_ARGS, dict(TASK))
    cfg = derive_config(ckpt, shapes, read_data_folder(FR_EN, TASK))
    assert cfg == get_preset("streamspeech")
    ours = {k: s for k, (s, _) in expected_tensors(cfg).items() if not k.startswith("vocoder.")}
    mapping, extras = plan_mapping(shapes, ours, "released")
    assert set(mapping) == set(ours)  # every EchoStream tensor has its source ...
    assert len(set(mapping.values())) == len(mapping) == len(shapes) - 4  # ... one to one
    assert sorted(extras) == sorted(["target_unigram_decoder.version", "decoder.version",
                                     "target_unigram_decoder.output_projection.weight",
                                     "decoder.embed_tokens.weight"])
    aliases = {"target_unigram_decoder.output_projection.weight", "decoder.embed_tokens.weight"}
    assert _params({k: s for k, s in shapes.items() if k not in aliases}) == RELEASED_PARAMETERS
    assert _params(ours) == RELEASED_PARAMETERS


def test_released_vocoder_maps_one_to_one():
    """The weight-normed generator's shapes plan onto our vocoder: every tensor, norm removed."""
    from types import SimpleNamespace

    from echostream.export.streamspeech_import import expected_tensors
    from echostream.export.vocoder_import import plan_vocoder

    shapes = released_generator_shapes()
    refs = {k: SimpleNamespace(shape=s) for k, s in shapes.items()}
    ours = {k[len("vocoder."):]: s for k, (s, _) in expected_tensors(get_preset("streamspeech")).items()
            if k.startswith("vocoder.")}
    plan = plan_vocoder(refs, ours, "g_00500000")
    assert [p.key for p in plan] == list(ours)
    normed = [p for p in plan if p.g is not None]
    assert len(normed) == sum(k.endswith("weight_g") for k in shapes) == 1 + 5 + 5 * 3 * 6 + 1
    without_g = {k: s for k, s in shapes.items() if not k.endswith("weight_g")}
    assert _params(without_g) == _params(ours) == 13_475_010


# ---- the restricted reader on its own ----------------------------------------------------------------


def _raw_torch_zip(path: Path, pickled: bytes) -> Path:
    """A torch-format zip whose data.pkl is ``pickled`` (for pickles torch.save would not write)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/.format_version", "1")
    return path


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
def test_reader_refuses_globals_outside_the_allow_list(protocol, tmp_path):
    import pickle

    from echostream.export.fairseq_checkpoint import TorchZipReader

    marker = tmp_path / "ran"
    for payload, name in ((_SystemPayload(marker), f"{os.system.__module__}.system"),
                          (_EvalPayload(marker), "builtins.eval")):
        path = _raw_torch_zip(tmp_path / f"p{protocol}.pt", pickle.dumps({"model": payload}, protocol=protocol))
        with pytest.raises(CheckpointError, match=re.escape(f"refusing to load {name}")), TorchZipReader(path) as r:
            r.load()
    # A class of the test module itself is no configuration class either.
    path = _raw_torch_zip(tmp_path / "cls.pt", pickle.dumps({"x": _Plain()}, protocol=protocol))
    with pytest.raises(CheckpointError, match="refusing to load .*_Plain"), TorchZipReader(path) as r:
        r.load()
    assert not marker.exists()


class _Plain:
    pass


def test_reader_refuses_allocations_the_file_does_not_hold(tmp_path):
    """``bytes(10**12)`` would allocate a terabyte from a 30-byte pickle: refused."""
    from echostream.export.fairseq_checkpoint import TorchZipReader

    path = _raw_torch_zip(tmp_path / "big.pt", b"cbuiltins\nbytes\n(I1000000000000\ntR.")
    with pytest.raises(CheckpointError, match=r"refusing bytes\(<int>\)"), TorchZipReader(path) as r:
        r.load()


def test_reader_maps_configuration_objects_to_plain_data(tmp_path, monkeypatch):
    """A DictConfig holding a Namespace (``allow_objects``, as fairseq's loader makes it), an
    interpolation, and an enum of fairseq's -> plain values; tensors are read lazily, and a tied
    pair is one storage."""
    import enum
    import types

    from omegaconf import OmegaConf

    from echostream.export.fairseq_checkpoint import TorchZipReader, read_fairseq_checkpoint

    class DDPBackend(enum.Enum):
        C10D = "c10d"

    DDPBackend.__module__, DDPBackend.__qualname__ = "fairseq.dataclass.constants", "DDPBackend"
    for name in ("fairseq", "fairseq.dataclass", "fairseq.dataclass.constants"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["fairseq.dataclass.constants"].DDPBackend = DDPBackend
    cfg = OmegaConf.create({"model": argparse.Namespace(encoder_layers=12, chunk_size=8),
                            "task": {"data": "/data/fr-en", "vocab": "${task.data}/dict.txt",
                                     "copy": "${task.data}"},
                            "distributed_training": {"ddp_backend": DDPBackend.C10D}},
                           flags={"allow_objects": True})
    weight = torch.randn(3, 4)
    path = tmp_path / "cfg.pt"
    torch.save({"cfg": cfg, "model": {"a": weight, "tied": weight, "b": weight[1:].t()}}, path)
    with TorchZipReader(path) as reader:
        ckpt = read_fairseq_checkpoint(reader)
        assert ckpt.cfg_kind == "omegaconf"
        assert ckpt.model_args == {"encoder_layers": 12, "chunk_size": 8}
        assert ckpt.task_args["copy"] == "/data/fr-en"  # a whole-string interpolation is resolved
        assert ckpt.state["a"].same_view(ckpt.state["tied"])
        assert torch.equal(reader.tensor(ckpt.state["b"]), weight[1:].t())
        top = reader.load()
    from echostream.export.fairseq_checkpoint import to_plain

    assert to_plain(top["cfg"])["distributed_training"] == {"ddp_backend": "c10d"}
    # numpy scalars (fairseq's meters and best-checkpoint values) become Python numbers.
    path = tmp_path / "numpy.pt"
    torch.save({"cfg": {"model": {"best": np.float64(3.25), "steps": np.int64(7)}}, "model": {"a": weight}}, path)
    with TorchZipReader(path) as reader:
        assert read_fairseq_checkpoint(reader).model_args == {"best": 3.25, "steps": 7}


def test_reader_reads_a_structured_config_of_fairseq_dataclasses(tmp_path, monkeypatch):
    """A pickled DictConfig built from fairseq-style dataclasses (typing annotations such as
    ``Optional[int]`` pickle as ``operator.getitem`` / ``type(None)``; a StreamSpeech criterion
    config lives in its plugin package ``ctc_unity``) reads as plain data."""
    import types
    from typing import List, Optional

    from omegaconf import OmegaConf

    from echostream.export.fairseq_checkpoint import TorchZipReader, read_fairseq_checkpoint, to_plain

    @dataclasses.dataclass
    class CommonConfig:
        fp16: bool = True
        seed: Optional[int] = 1
        tags: List[str] = dataclasses.field(default_factory=lambda: ["simul"])

    @dataclasses.dataclass
    class CriterionConfig:
        label_smoothing: float = 0.1
        rdrop_alpha: Optional[float] = None

    classes = {"fairseq.dataclass.configs": CommonConfig,
               "ctc_unity.criterions.speech_to_speech_ctc_asr_st_criterion": CriterionConfig}
    for module, cls in classes.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        cls.__module__, cls.__qualname__ = module, cls.__name__
        # the annotations are strings here (postponed evaluation): resolved in the class's module
        vars(sys.modules[module]).update({cls.__name__: cls, "Optional": Optional, "List": List})
    cfg = OmegaConf.create({"common": OmegaConf.structured(CommonConfig),
                            "criterion": OmegaConf.structured(CriterionConfig),
                            "model": argparse.Namespace(encoder_layers=12)}, flags={"allow_objects": True})
    path = tmp_path / "structured.pt"
    torch.save({"cfg": cfg, "model": {"a": torch.ones(2)}}, path)
    with TorchZipReader(path) as reader:
        ckpt = read_fairseq_checkpoint(reader)
        plain = to_plain(reader.load()["cfg"])
    assert ckpt.model_args == {"encoder_layers": 12}
    assert plain["common"] == {"fp16": True, "seed": 1, "tags": ["simul"]}
    assert plain["criterion"] == {"label_smoothing": 0.1, "rdrop_alpha": None}


def test_reader_narrow_helpers_refuse_other_uses(tmp_path):
    """``type`` and ``operator.getitem`` are allowed only as typing's pickles use them (older
    omegaconf versions keep ``Optional[int]`` as a field's ``ref_type``)."""
    import pickle
    from typing import Dict, Optional

    from echostream.export.fairseq_checkpoint import PickledObject, TorchZipReader

    path = _raw_torch_zip(tmp_path / "typing.pt", pickle.dumps(
        {"ref_type": Optional[int], "dict": Dict[str, int]}, protocol=2))
    with TorchZipReader(path) as r:
        loaded = r.load()
    assert all(isinstance(v, PickledObject) and v.module == "typing" for v in loaded.values())

    cases = {b"cbuiltins\ntype\n(S'x'\n(t}tR.": r"refusing builtins.type\(str, tuple, dict\)",
             b"c_operator\ngetitem\n((lp0\nI1\naI0\ntR.": r"refusing operator.getitem on list"}
    for i, (pickled, match) in enumerate(cases.items()):
        path = _raw_torch_zip(tmp_path / f"n{i}.pt", pickled)
        with pytest.raises(CheckpointError, match=match), TorchZipReader(path) as r:
            r.load()


@needs_data
def test_a_data_folder_of_another_language_pair_gets_a_notice(files, source_model, tmp_path, capsys, monkeypatch):
    """Every size check passes for a wrong folder (all vocabularies have 6000 pieces): the import
    says that the training data (es-en here) and the dictionaries (fr) disagree."""
    monkeypatch.setitem(TASK, "data", "/data/zhangshaolei/datasets/cvss/cvss-c/es-en/fbank2unit")
    ckpt = write_variant(tmp_path / "es.pt", source_model, form="args")
    assert cli.main(import_argv(ckpt, files, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "trained on es-en data" in err and "holds fr dictionaries (spm_unigram_fr.txt)" in err
    monkeypatch.setitem(TASK, "data", "/data/zhangshaolei/datasets/cvss/cvss-c/fr-en/fbank2unit")
    ckpt = write_variant(tmp_path / "fr.pt", source_model, form="args")
    assert cli.main(import_argv(ckpt, files, tmp_path / "out2")) == 0
    assert "notice" not in capsys.readouterr().err


@needs_data
def test_refuses_dims_our_modules_cannot_build(files, source_model, tmp_path, capsys):
    """Args and shapes agree on an even depthwise kernel, which no 'same'-padded conv has."""
    def even_kernel(state):
        for key in [k for k in state if k.endswith("conv_module.depthwise_conv.weight")]:
            state[key] = torch.zeros(32, 1, 6)

    ckpt = write_variant(tmp_path / "even.pt", source_model, edit=even_kernel, depthwise_conv_kernel_size=6)
    out = tmp_path / "out"
    refused(capsys, import_argv(ckpt, files, out), out, str(ckpt), "the architecture does not build",
            "kernel_size must be odd", "got 6")
