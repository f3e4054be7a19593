"""The ``streamspeech_tiny`` preset as a first-class pipeline: all 7 stages exported (the chunk
Conformer as the ``encoder`` stage), lint-clean, ONNX Runtime parity with the reference (including
the encoder's full-utterance check with a partial last chunk), and the translator end to end on
onnxruntime and on the torch backend."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from echostream import cli
from echostream.contract import ALL_STAGE_NAMES
from echostream.errors import EchoStreamError
from echostream.runtime.artifacts import load_artifacts
from echostream.runtime.events import AsrText, EndOfSentence, SpeechChunk, TranslationText
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.translator import SegmentSizeError, Translator

from test_translator import bursts, ids, translate

POLICY = PolicyConfig(final_max_len=8)


@pytest.fixture(scope="module")
def artifacts(streamspeech_tiny_artifacts_dir):
    return load_artifacts(streamspeech_tiny_artifacts_dir)


def test_every_stage_is_exported_with_the_conformer_contract(artifacts):
    assert list(artifacts.stages) == list(ALL_STAGE_NAMES)
    contract = artifacts.contract("encoder")
    assert [t.name for t in contract.data_inputs] == ["x", "valid_frames"]
    assert contract.state_names == ["keys", "values", "subsample_context", "conv_context",
                                    "processed_chunks"]
    assert contract.spec("x").shape == ("B", 2 + 32, 80)
    assert contract.spec("keys").shape == ("B", 2, 256, 32)
    meta = {p.key: p.value for p in onnx.load(str(artifacts.stage_path("encoder"))).metadata_props}
    assert meta["encoder_kind"] == "conformer" and meta["chunk_size"] == "8"
    assert meta["conv_chunk_size"] == "8"


def test_lint_is_clean(streamspeech_tiny_artifacts_dir, capsys):
    assert cli.main(["lint", str(streamspeech_tiny_artifacts_dir)]) == 0
    captured = capsys.readouterr()
    assert "9 graph(s), 0 violation(s)" in captured.err and captured.out == ""


def test_parity_on_onnxruntime(artifacts):
    from echostream.export.parity import format_table, run_parity

    results = run_parity(artifacts, "onnxruntime", steps=10)
    assert all(r.passed for r in results), format_table(results)
    checks = {(r.stage, r.check) for r in results}
    for check in ("zero-state chain", "random-state chain", "batch positions", "full utterance"):
        assert ("encoder", check) in checks
    assert max(r.max_abs for r in results if r.stage == "encoder") > 0  # something was compared


def test_full_utterance_check_catches_a_wrong_conv_rule(artifacts, monkeypatch):
    """The reference with the old 4C / 2C / C conv chunks is not what the graph computes."""
    from echostream.export import parity
    from echostream.models import conformer_encoder

    monkeypatch.setattr(conformer_encoder, "conformer_conv_chunk", lambda chunk: 4 * chunk)
    result = {(r.stage, r.check): r for r in parity.run_parity(artifacts, "onnxruntime", steps=3,
                                                                stages=["encoder"])}
    assert not result[("encoder", "full utterance")].passed


def test_translator_on_onnxruntime_and_torch_gives_the_same_ids(streamspeech_tiny_artifacts_dir):
    pytest.importorskip("torch", reason="the torch reference backend needs PyTorch")
    audio = bursts(1.4, seed=5)
    runs = {}
    for backend in ("onnxruntime", "torch"):
        translator = Translator.from_artifacts(streamspeech_tiny_artifacts_dir, backend=backend,
                                               policy=POLICY)
        runs[backend], _ = translate(translator, audio, 2500)
    ort, ref = runs["onnxruntime"], runs["torch"]
    assert [type(e) for e in ort] == [type(e) for e in ref]
    for kind in (AsrText, TranslationText, SpeechChunk):
        assert ids(ort, kind) == ids(ref, kind), kind.__name__
    assert len(ids(ort, AsrText)) >= 3 and len(ids(ort, TranslationText)) >= 2
    assert ids(ort, SpeechChunk), "expected speech"


@pytest.mark.parametrize("extra_fbank", [0, 5, 21])
def test_streamed_ctc_equals_the_full_pass_with_a_partial_last_chunk(streamspeech_tiny_artifacts_dir,
                                                                     artifacts, extra_fbank):
    """Audio that ends on a chunk boundary, or 5 / 21 fbank frames into a chunk: the streamed ASR
    and ST CTC tokens equal greedy CTC over the reference's full pass on the same features."""
    torch = pytest.importorskip("torch", reason="the full-utterance reference needs PyTorch")
    from echostream.export.torch_backend import load_reference_model
    from echostream.runtime.ctc import greedy_ctc_decode
    from echostream.runtime.features import FeatureStream

    translator = Translator.from_artifacts(streamspeech_tiny_artifacts_dir, policy=POLICY)
    fbank = 4 * 8 * 4 + extra_fbank  # 1.3 s: the sentence stays below the target capacity
    audio = bursts(3.0, seed=extra_fbank)[: 400 + 160 * (fbank - 1)]
    events, stream = translate(translator, audio, 3000)
    assert [e.reason for e in events if isinstance(e, EndOfSentence)] == ["end_of_input"]
    features = FeatureStream(artifacts.config["features"], artifacts.cmvn_mean, artifacts.cmvn_std)
    features.accept_waveform(audio)
    assert features.num_frames == fbank
    x = torch.from_numpy(features.frames(0, fbank))[None]
    with torch.no_grad():
        out = load_reference_model(artifacts)(x, torch.tensor([fbank]))
    assert out["asr_log_probs"].shape[0] == (fbank - 1) // 4 + 1
    pad, unk = artifacts.config["mt"]["pad"], artifacts.config["mt"]["unk"]
    for head, streamed in (("asr_log_probs", stream.asr_tokens), ("st_log_probs",
                                                                  stream.st_ctc.tokens)):
        offline = greedy_ctc_decode(out[head][:, 0].numpy(), 0, (pad, unk), (pad,))
        assert streamed == offline and len(offline) >= 2, head


@pytest.mark.parametrize("segment_ms", [160, 640, 480, 0])
def test_other_segment_sizes_are_refused(streamspeech_tiny_artifacts_dir, segment_ms):
    with pytest.raises(SegmentSizeError) as err:
        Translator.from_artifacts(streamspeech_tiny_artifacts_dir, segment_ms=segment_ms)
    assert str(err.value) == (f"segment size the chunk Conformer cannot serve: segment_ms="
                              f"{segment_ms}; expected 320 (its exported chunk of 8 frames x 40 ms)")


def test_a_chunk_size_that_cannot_stream_is_refused_before_export(tmp_path):
    from echostream.export.commands import export_artifacts
    from echostream.config import get_preset
    from echostream.models.weights import build_model

    cfg = get_preset("streamspeech_tiny")
    cfg.encoder = dataclasses.replace(cfg.encoder, chunk_size=20)
    with pytest.raises(EchoStreamError, match="encoder: encoder.chunk_size 20 cannot stream"):
        export_artifacts(tmp_path / "x", model=build_model(cfg), progress=False)
    assert not (tmp_path / "x").exists()


def test_zero_padded_tail_and_silence_finish(streamspeech_tiny_artifacts_dir):
    """Silence, and audio shorter than one chunk (a single partial chunk), end cleanly."""
    translator = Translator.from_artifacts(streamspeech_tiny_artifacts_dir, policy=POLICY)
    for audio in (np.zeros(16000, np.float32), bursts(0.15, seed=1)):
        events, stream = translate(translator, audio, len(audio))
        assert stream.finished and events[-1].kind == "end"
        assert stream.clock.to_dict()["encoder"]["calls"] == -(-((len(audio) - 400) // 160 + 1) // 32)
