"""The ``exact`` fidelity mode (issue 11): StreamSpeech's agent, call for call, on the stage graphs
equals the PyTorch reference written from the agent's code (``models/streamspeech_agent.py``):
identical ASR, translation and unit ids, speech within 1e-5, for both presets (the chunk
Conformer at 320 and 640 ms, whole-word mode included; the Emformer at 320 ms), batched streams,
any chunking of the input; what it refuses, it refuses in one line.

Why it can fail: the graphs keep completed chunks and re-evaluate only the chunk in progress at
each call, splice that chunk's cross-attention K/V into a copy of the kept cache, re-run the MT
decoder from a fresh state, decode units with full cross-attention over a padded sentence graph
and synthesise only the tail from windows; the reference re-encodes and re-decodes everything
with the PyTorch modules, the agent's way. Any off-by-one at a call boundary, a mask on the
partial chunk, the pad position of the whole-word final input or the vocoder tail shows.
"""
from __future__ import annotations

import dataclasses

import pytest

from echostream.errors import ArtifactError
from echostream.runtime.events import (EndOfSentence, EndOfStream, SpeechChunk,
                                       TranslationText)
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.translator import SegmentSizeError, Translator

from test_chunking_invariance import assert_same_events
from test_translator import bursts, translate

torch = pytest.importorskip("torch", reason="the exact mode's reference agent needs PyTorch")

POLICY = PolicyConfig(final_max_len=12)


def exact(folder, backend: str, segment_ms: int = 320) -> Translator:
    return Translator.from_artifacts(folder, backend=backend, segment_ms=segment_ms,
                                     policy=POLICY, fidelity="exact")


@pytest.fixture(scope="module")
def conformer_640(tmp_path_factory):
    """``streamspeech_tiny`` with a 16-frame chunk: the agent's 640 ms setting (whole-word mode,
    conv chunk 16)."""
    from echostream.config import get_preset
    from echostream.export.commands import export_artifacts
    from echostream.models.weights import build_model

    cfg = get_preset("streamspeech_tiny")
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, chunk_size=16))
    out = tmp_path_factory.mktemp("exact") / "c16"
    export_artifacts(out, model=build_model(cfg), force=True, progress=False, log=lambda _: None)
    return out


CASES = [("streamspeech_tiny", 320, 2.4, 1), ("streamspeech_tiny", 320, 4.0, 7),
         ("tiny", 320, 2.4, 2), ("conformer_640", 640, 3.5, 3)]


@pytest.mark.parametrize("name,segment_ms,seconds,seed", CASES)
def test_graphs_equal_the_reference_agent(name, segment_ms, seconds, seed, request):
    folder = request.getfixturevalue(
        {"streamspeech_tiny": "streamspeech_tiny_artifacts_dir", "tiny": "tiny_artifacts_dir",
         "conformer_640": "conformer_640"}[name])
    audio = bursts(seconds, seed=seed)
    runs = {b: translate(exact(folder, b, segment_ms), audio, 5000)[0]
            for b in ("onnxruntime", "torch")}
    ort, ref = runs["onnxruntime"], runs["torch"]
    assert_same_events(ort, ref)
    assert any(isinstance(e, TranslationText) for e in ort) and any(
        isinstance(e, SpeechChunk) for e in ort), "random weights still write and speak"
    assert isinstance(ort[-1], EndOfStream) and isinstance(ort[-2], EndOfSentence)


def test_calls_follow_the_agents_segments(streamspeech_tiny_artifacts_dir):
    """Every event is stamped with the audio of its call: a multiple of the segment, or the end."""
    audio = bursts(2.1, seed=4)
    events, _ = translate(exact(streamspeech_tiny_artifacts_dir, "onnxruntime"), audio, 777)
    end_ms = 1000 * len(audio) / 16000
    assert all(e.source_ms % 320 == 0 or e.source_ms == pytest.approx(end_ms) for e in events)
    # The agent's prefix is reported with what each event takes back: replaying the events gives
    # the final translation.
    text: list[int] = []
    for e in events:
        if isinstance(e, TranslationText):
            text = text[:len(text) - e.replaces] + list(e.token_ids)
    assert tuple(text) == events[-1].translation_ids


def test_whole_word_final_input_ends_with_a_pad_position(conformer_640):
    """At 640 ms the agent's final MT input ends with one pad: the graphs feed it as a pad (its own
    key masked) and still equal the reference (a final decode that writes: room to the cap)."""
    policy = PolicyConfig(final_max_len=40)
    translators = {b: Translator.from_artifacts(conformer_640, backend=b, segment_ms=640,
                                                policy=policy, fidelity="exact")
                   for b in ("onnxruntime", "torch")}
    translator = translators["onnxruntime"]
    stage = translator.stages["mt_decoder"]
    original, pads = stage.run, []

    def spy(inputs, state=None, context=None):
        pads.append(int(inputs["is_pad"][0]))
        return original(inputs, state, context)

    stage.run = spy
    audio = bursts(1.5, seed=1)
    try:
        events, _ = translate(translator, audio, 5000)
    finally:
        del stage.run
    assert 1 in pads
    assert_same_events(events, translate(translators["torch"], audio, 5000)[0])


def test_exact_mode_is_chunking_invariant_and_batches(streamspeech_tiny_artifacts_dir):
    translator = exact(streamspeech_tiny_artifacts_dir, "onnxruntime")
    audios = [bursts(1.8, seed=s) for s in (5, 6, 8)]
    alone = [translate(translator, a, len(a))[0] for a in audios]
    for a, want in zip(audios, alone):
        assert_same_events(translate(translator, a, 1234)[0], want)
    streams = [translator.create_stream() for _ in audios]
    got: list[list] = [[] for _ in audios]
    for start in range(0, max(len(a) for a in audios), 4000):
        for s, a in zip(streams, audios):
            if start < len(a):
                s.accept_waveform(16000, a[start:start + 4000])
                if start + 4000 >= len(a):
                    s.input_finished()
        for i, new in enumerate(translator.decode_streams(streams)):
            got[i] += new
    for events, want in zip(got, alone):
        assert_same_events(events, want)


def test_exact_mode_refusals(tiny_artifacts_dir, tmp_path):
    import shutil

    from echostream.export.commands import export_artifacts

    plain = tmp_path / "plain"
    export_artifacts(plain, preset="tiny", force=True, progress=False, log=lambda _: None,
                     stages=["encoder", "st_ctc", "mt_source", "mt_decoder", "unit_decoder",
                             "duration", "vocoder"])
    with pytest.raises(ArtifactError, match=r"--fidelity exact needs the stage graphs "
                                            r"\['unit_sentence'\].*--sentence-graphs"):
        exact(plain, "onnxruntime")
    shutil.rmtree(plain)
    from echostream.config import get_preset
    from echostream.runtime.translator import check_exact

    cfg = get_preset("streamspeech_tiny")
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, chunk_size=24))
    with pytest.raises(SegmentSizeError, match="exact cannot serve segment_ms=960"):
        check_exact(cfg, 960)
    with pytest.raises(ValueError, match="fidelity expected one of"):
        Translator.from_artifacts(tiny_artifacts_dir, fidelity="approximate")
