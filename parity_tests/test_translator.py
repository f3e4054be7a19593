"""The simultaneous runtime end to end on exported tiny artifacts (runtime/translator.py).

- ONNX Runtime and the PyTorch reference backend give the same event sequence (token and unit ids);
- the same audio fed in different chunk sizes (and at 48 kHz) gives identical events;
- streams interleaved through one translator give exactly what each gives alone;
- ``reset()`` mid-stream starts a sentence that equals a fresh stream fed the remaining audio;
- a segment size the encoder cannot serve is refused with a clear error.

Audio is synthetic (tone and noise bursts separated by silences, seeded): with random weights the
model still emits ASR tokens at the bursts, so the policy writes several times per utterance.
"""
from __future__ import annotations

import numpy as np
import pytest

from echostream.contract import subsampled_frame_count
from echostream.errors import AudioError, EchoStreamError
from echostream.runtime.events import (AsrText, EndOfSentence, EndOfStream, SpeechChunk,
                                       TranslationText)
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.translator import SegmentSizeError, Translator

SR = 16000
POLICY = PolicyConfig(final_max_len=12)  # short final decodes keep the tests fast


def bursts(seconds: float, seed: int, burst_s: float = 0.2, rate: int = SR) -> np.ndarray:
    """Tone + noise bursts of random pitch and level, every other ``burst_s`` slot silent."""
    rng = np.random.default_rng(seed)
    n, slot = int(rate * seconds), int(rate * burst_s)
    out = np.zeros(n, np.float32)
    for k, start in enumerate(range(0, n, slot)):
        m = min(slot, n - start)
        f0, amp, noise = rng.uniform(80, 4000), rng.uniform(0.05, 0.9), rng.uniform(0, 0.5)
        if k % 2:
            continue
        t = np.arange(m) / rate
        burst = amp * np.sin(2 * np.pi * f0 * t) + noise * rng.standard_normal(m)
        out[start:start + m] = np.clip(burst, -1, 1)
    return out


def translate(translator: Translator, audio: np.ndarray, chunk: int, rate: int = SR):
    stream = translator.create_stream()
    events = []
    for start in range(0, len(audio), chunk):
        stream.accept_waveform(rate, audio[start:start + chunk])
        events += translator.decode(stream)
    stream.input_finished()
    events += translator.decode(stream)
    return events, stream


def ids(events, kind):
    return [t for e in events if isinstance(e, kind)
            for t in (e.unit_ids if kind is SpeechChunk else e.token_ids)]


@pytest.fixture(scope="module")
def translator(tiny_artifacts_dir) -> Translator:
    return Translator.from_artifacts(tiny_artifacts_dir, backend="onnxruntime", policy=POLICY,
                                     deterministic=True)


@pytest.fixture(scope="module")
def reference(translator):
    """One utterance decoded in a single chunk: the events every other feeding must reproduce."""
    audio = bursts(2.0, seed=0)
    events, stream = translate(translator, audio, len(audio))
    return audio, events, stream


def test_events_are_consistent(reference, translator):
    audio, events, stream = reference
    end = events[-1]
    assert isinstance(end, EndOfStream) and stream.finished
    assert sum(isinstance(e, EndOfStream) for e in events) == 1
    asr, tgt = ids(events, AsrText), ids(events, TranslationText)
    assert len(asr) >= 3, "the bursts should make the ASR head emit several tokens"
    assert sum(isinstance(e, TranslationText) for e in events) >= 2, "expected several writes"
    assert tuple(tgt) == end.translation_ids == tuple(stream.committed_tokens)
    assert len(tgt) <= translator.target_capacity
    assert asr == stream.asr_tokens
    assert end.asr_text == translator.src_vocab.decode(asr)
    assert "".join(e.text for e in events if isinstance(e, TranslationText)).strip() == \
        end.translation_text
    speech = [e for e in events if isinstance(e, SpeechChunk)]
    assert speech and all(e.samples.dtype == np.float32 and e.sample_rate == SR for e in speech)
    assert end.num_samples == sum(len(e.samples) for e in speech) > 0
    # delays never decrease, and no event needs more audio than there is
    delays = [e.source_ms for e in events]
    assert delays == sorted(delays) and delays[-1] == pytest.approx(1000 * len(audio) / SR)
    computes = [e.compute_ms for e in events]
    assert computes == sorted(computes) and computes[-1] > 0
    # every stage ran and was timed
    timings = stream.clock.to_dict()
    assert set(timings) == set(translator.stages)
    assert all(t["calls"] > 0 and t["seconds"] > 0 for t in timings.values())
    # encoder calls: one S-frame step per started segment of output frames (the last R
    # subsampled frames are right context only)
    frames = subsampled_frame_count(1 + (len(audio) - 400) // 160) - translator.right_context
    assert timings["encoder"]["calls"] == -(-frames // translator.segment_length)
    for e in events:
        assert e.to_json()["type"] == e.kind


def test_decode_after_the_end_returns_nothing(reference, translator):
    _, _, stream = reference
    assert translator.decode(stream) == []
    with pytest.raises(ValueError, match="after input_finished"):
        stream.accept_waveform(SR, np.zeros(160, np.float32))


@pytest.mark.parametrize("chunk", [160, 1111, 5120])
def test_chunk_size_does_not_change_events(reference, translator, chunk):
    audio, expected, _ = reference
    events, _ = translate(translator, audio, chunk)
    assert events == expected


def test_resampled_input_is_chunk_invariant(translator):
    audio = bursts(1.5, seed=3, rate=48000)
    whole, _ = translate(translator, audio, len(audio), rate=48000)
    pieces, _ = translate(translator, audio, 4801, rate=48000)
    assert pieces == whole
    assert whole[-1].source_ms == pytest.approx(1500.0, abs=0.1)


def test_interleaved_streams_equal_streams_alone(translator):
    audios = [bursts(1.6, seed=s) for s in (11, 12, 13)]
    alone = [translate(translator, a, len(a))[0] for a in audios]
    streams = [translator.create_stream() for _ in audios]
    got = [[] for _ in audios]
    chunk = 2400
    for start in range(0, max(len(a) for a in audios), chunk):
        for i in (2, 0, 1):  # a fixed but scrambled order
            if start < len(audios[i]):
                streams[i].accept_waveform(SR, audios[i][start:start + chunk])
                got[i] += translator.decode(streams[i])
    for i, stream in enumerate(streams):
        stream.input_finished()
        got[i] += translator.decode(stream)
    assert got == alone
    assert len({tuple(ids(e, AsrText)) for e in alone}) > 1, "different audio, same ASR?"


def test_reset_after_the_end_reuses_the_stream(reference, translator):
    audio, expected, _ = reference
    stream = translator.create_stream()
    stream.accept_waveform(SR, audio)
    stream.input_finished()
    assert translator.decode(stream) == expected
    stream.reset()
    assert not stream.finished
    stream.accept_waveform(SR, audio)
    stream.input_finished()
    assert translator.decode(stream) == expected


def test_reset_mid_stream_starts_a_fresh_sentence(reference, translator):
    audio, _, _ = reference
    stream = translator.create_stream()
    stream.accept_waveform(SR, audio[: SR // 2])
    translator.decode(stream)
    stream.reset()
    start_frame = stream.sentence.frame_base
    assert start_frame > 0 and stream.policy.committed == []
    stream.accept_waveform(SR, audio[SR // 2:])
    stream.input_finished()
    after = translator.decode(stream)
    # fbank frame t covers samples [160 t, 160 t + 400): the rest of the audio from the sentence
    # start gives the very same frames, hence the same events, 10 ms per frame later.
    fresh, _ = translate(translator, audio[start_frame * 160:], len(audio))
    assert [type(e) for e in after] == [type(e) for e in fresh]
    assert ids(after, AsrText) == ids(fresh, AsrText)
    assert ids(after, TranslationText) == ids(fresh, TranslationText)
    assert ids(after, SpeechChunk) == ids(fresh, SpeechChunk)
    shift = start_frame * 10.0
    assert [e.source_ms for e in after[:-1]] == pytest.approx(
        [e.source_ms + shift for e in fresh[:-1]])


def test_whole_word_mode_runs(tiny_artifacts_dir):
    translator = Translator.from_artifacts(tiny_artifacts_dir, segment_ms=640, policy=POLICY)
    assert translator.policy_config.whole_word and translator.steps_per_segment == 4
    events, stream = translate(translator, bursts(2.0, seed=0), 3200)
    assert isinstance(events[-1], EndOfStream)
    assert ids(events, TranslationText) == stream.committed_tokens


def test_silence_and_too_short_audio(translator):
    events, _ = translate(translator, np.zeros(SR, np.float32), SR)
    assert isinstance(events[-1], EndOfStream)
    events, stream = translate(translator, np.zeros(100, np.float32), 100)
    assert events == [EndOfSentence("end_of_input", 100 / 16.0), EndOfStream(100 / 16.0)]
    assert stream.finished


def test_bad_audio_is_refused(translator):
    stream = translator.create_stream()
    with pytest.raises(AudioError, match="NaN"):
        stream.accept_waveform(SR, np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="mono"):
        stream.accept_waveform(SR, np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="sample_rate"):
        stream.accept_waveform(0, np.zeros(100, np.float32))
    stream.accept_waveform(SR, np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="expected 16000, got 8000"):
        stream.accept_waveform(8000, np.zeros(100, np.float32))
    other = Translator(translator.stages, translator.config, translator.src_vocab,
                       translator.tgt_vocab)
    with pytest.raises(ValueError, match="another Translator"):
        other.decode(stream)


@pytest.mark.parametrize("segment_ms", [100, 240, 0, -160])
def test_unservable_segment_size_is_refused(tiny_artifacts_dir, segment_ms):
    with pytest.raises(SegmentSizeError, match="segment size the encoder cannot serve") as err:
        Translator.from_artifacts(tiny_artifacts_dir, segment_ms=segment_ms)
    assert isinstance(err.value, EchoStreamError) and isinstance(err.value, ValueError)
    assert "multiple of the exported encoder segment (4 frames x 40 ms = 160 ms)" in str(err.value)


def test_onnxruntime_and_torch_backends_give_the_same_events(tiny_artifacts_dir):
    pytest.importorskip("torch", reason="the torch reference backend needs PyTorch")
    audio = bursts(1.2, seed=5)
    policy = PolicyConfig(final_max_len=6)
    runs = {}
    for backend in ("onnxruntime", "torch"):
        translator = Translator.from_artifacts(tiny_artifacts_dir, backend=backend, policy=policy)
        runs[backend], _ = translate(translator, audio, 4000)
    ort, ref = runs["onnxruntime"], runs["torch"]
    assert [type(e) for e in ort] == [type(e) for e in ref]
    for kind in (AsrText, TranslationText, SpeechChunk):
        assert ids(ort, kind) == ids(ref, kind), kind.__name__
    for a, b in zip(ort, ref):
        assert a.source_ms == b.source_ms
        if isinstance(a, SpeechChunk):
            np.testing.assert_allclose(a.samples, b.samples, atol=1e-4)


@pytest.mark.parametrize("segments,seed", [(9, 0), (10, 1), (13, 2)])
def test_ctc_tokens_equal_the_full_utterance_pass(tiny_artifacts, translator, segments, seed):
    """An utterance that ends on an encoder-segment boundary: the streamed ASR and ST CTC tokens
    equal greedy CTC over the reference model's full-utterance forward pass."""
    torch = pytest.importorskip("torch", reason="the full-utterance reference needs PyTorch")
    from echostream.export.torch_backend import load_reference_model
    from echostream.runtime.ctc import greedy_ctc_decode
    from echostream.runtime.features import FeatureStream

    S, R = translator.segment_length, translator.right_context
    # T_sub - R = segments * S output frames, and every first-conv row the last frame reads is a
    # computed one (F >= 4 T_sub - 1); F = 4 T_sub - 3 or - 2 leave the last frame approximate.
    fbank = 4 * (segments * S + R) - 1 + seed % 2
    audio = bursts(3.0, seed)[: 400 + 160 * (fbank - 1)]
    _, stream = translate(translator, audio, 3000)

    features = FeatureStream(tiny_artifacts.config["features"], tiny_artifacts.cmvn_mean,
                             tiny_artifacts.cmvn_std)
    features.accept_waveform(audio)
    x = torch.from_numpy(features.frames(0, features.num_frames))[None]
    with torch.no_grad():
        out = load_reference_model(tiny_artifacts)(x, torch.tensor([x.shape[1]]))
    assert out["asr_log_probs"].shape[0] == segments * S
    pad, unk = tiny_artifacts.config["mt"]["pad"], tiny_artifacts.config["mt"]["unk"]
    for head, streamed in (("asr_log_probs", stream.asr_tokens), ("st_log_probs",
                                                                  stream.st_ctc.tokens)):
        offline = greedy_ctc_decode(out[head][:, 0].numpy(), 0, (pad, unk), (pad,))
        assert streamed == offline and len(offline) >= 2, head


def test_short_unit_graph_gives_the_full_graphs_events(tiny_artifacts_dir):
    """Sentences start on ``unit_decoder_short`` (8 text states in tiny) and move to
    ``unit_decoder`` with grown caches: the events (token and unit ids, samples within 1e-5) equal
    a translator that runs the full graph only, and both graphs really ran (a sentence crossed)."""
    from test_chunking_invariance import assert_same_events

    short = Translator.from_artifacts(tiny_artifacts_dir)
    assert short.unit_short == 8
    stages = {k: v for k, v in short.stages.items() if k != "unit_decoder_short"}
    full = Translator(stages, short.config, short.src_vocab, short.tgt_vocab, short.cmvn_mean,
                      short.cmvn_std, 320)
    assert full.unit_short == 0
    calls: dict[str, int] = {}
    for name in ("unit_decoder_short", "unit_decoder"):
        stage, run = short.stages[name], short.stages[name].run

        def spy(inputs, state=None, context=None, name=name, run=run):
            calls[name] = calls.get(name, 0) + 1
            return run(inputs, state, context)

        stage.run = spy
    audio = bursts(6.0, seed=1)
    events = {}
    for label, translator in (("full", full), ("short", short)):
        stream = translator.create_stream()
        stream.accept_waveform(SR, audio)
        stream.input_finished()
        before = dict(calls)
        events[label] = translator.decode(stream)
        if label == "short":
            assert calls["unit_decoder_short"] - before.get("unit_decoder_short", 0) >= 8
            assert calls["unit_decoder"] > before.get("unit_decoder", 0)
    assert_same_events(events["short"], events["full"])
    assert sum(len(e.unit_ids) for e in events["short"] if isinstance(e, SpeechChunk)) > 0


def test_growing_a_fifo_state_refuses_a_shrink():
    from echostream.contract import stage_contract
    from echostream.runtime.stage import grow_fifo_state
    from echostream.config import get_preset

    contract = stage_contract("unit_decoder_short", get_preset("tiny").to_dict())
    big = {s.name: np.ones((1,) + tuple(2 * d for d in s.shape[1:]), s.dtype)
           for s in contract.states}
    with pytest.raises(ValueError, match="cannot grow"):
        grow_fifo_state(big, contract)
