"""Windows that hold a sentence (issue 10, item 2).

Module level: within the sentence capacity (``sentence.max_source_frames`` encoder frames,
``sentence.max_target_tokens`` tokens) every streaming module equals the *unbounded* causal module
that StreamSpeech runs (a twin with the same weights and windows far larger than any input): a
sentence of exactly the capacity is still exact, one step more shows the window.

Runtime level: at the capacity nothing slides. The translator ends the sentence with an
``EndOfSentence`` whose reason names the capacity, exactly where the next segment (or the next
token) would not fit, and the next sentence equals a fresh stream fed the remaining audio.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from echostream.config import get_preset
from echostream.models.decoders.ctc_decoder import CTCDecoderWithTransformerLayer
from echostream.models.decoders.transformer_decoder import TransformerMTDecoder
from echostream.runtime.events import AsrText, EndOfSentence, EndOfStream, SpeechChunk, TranslationText
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.translator import Translator

from test_translator import SR, bursts, ids, translate

ATOL = 1e-5
UNBOUNDED = 100_000


def _twin(module: torch.nn.Module, build) -> torch.nn.Module:
    other = build().eval()
    other.load_state_dict(module.state_dict())
    return other


# ---- modules ---------------------------------------------------------------------------------


def st_ctc(left_context: int) -> CTCDecoderWithTransformerLayer:
    torch.manual_seed(0)
    return CTCDecoderWithTransformerLayer(16, 40, layers=2, heads=2, ffn=32,
                                          left_context=left_context).eval()


@torch.no_grad()
def test_st_ctc_holds_a_sentence_of_exactly_max_source_frames():
    capacity, S = 24, 4
    model = st_ctc(capacity)
    unbounded = _twin(model, lambda: st_ctc(UNBOUNDED))
    frames = torch.randn(1, capacity + S, 16)
    state, outs = model.initial_state(1), []
    for k in range(0, capacity + S, S):
        y, state = model.step(frames[:, k:k + S], state)
        outs.append(y)
    streamed = torch.cat(outs, dim=1)
    want = unbounded(frames.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(streamed[:, :capacity], want[:, :capacity], atol=ATOL, rtol=0)
    # Frame `capacity` still sees frames [0, capacity]; the step after it would drop frame 0.
    torch.testing.assert_close(streamed[:, capacity], want[:, capacity], atol=ATOL, rtol=0)
    assert (streamed[:, capacity + 1:] - want[:, capacity + 1:]).abs().max() > 1e-4


def mt(tokens: int, frames: int) -> TransformerMTDecoder:
    torch.manual_seed(0)
    return TransformerMTDecoder(50, d_model=16, layers=2, heads=2, ffn=32, encoder_dim=8,
                                max_target_tokens=tokens, max_source_frames=frames).eval()


@torch.no_grad()
def test_mt_decoder_holds_a_sentence_of_exactly_max_target_tokens_and_max_source_frames():
    T, F = 6, 20
    model = mt(T, F)
    unbounded = _twin(model, lambda: mt(UNBOUNDED, UNBOUNDED))
    source = torch.randn(1, F, 8)
    prev = torch.tensor([[2] + list(range(5, 5 + T))])  # </s> + T tokens: positions 0..T
    context = model.initial_source_state(1)
    for k in range(0, F, 4):
        context = model.source_step(source[:, k:k + 4], context)
    state, logp, hidden = model.initial_state(1), [], []
    for t in range(T + 1):
        (lp, h), state = model.step(prev[:, t].to(torch.int32), context, state)
        logp.append(lp)
        hidden.append(h)
    want_lp, want_h = unbounded(prev, source.transpose(0, 1))
    torch.testing.assert_close(torch.stack(logp, 1), want_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(hidden, 1), want_h, atol=ATOL, rtol=0)
    # One token or one frame more and the bounded caches no longer equal the unbounded module.
    longer = torch.tensor([[2] + list(range(5, 6 + T))])
    assert (model(longer, source.transpose(0, 1))[0] - unbounded(longer, source.transpose(0, 1))[0]
            ).abs().max() > 1e-4
    more = torch.randn(1, F + 1, 8)
    assert (model(prev, more.transpose(0, 1))[0] - unbounded(prev, more.transpose(0, 1))[0]
            ).abs().max() > 1e-4


def test_presets_derive_every_window_from_the_sentence_capacity():
    from echostream.contract import stage_contract

    for name in ("echostream", "tiny"):
        cfg = get_preset(name)
        d = cfg.to_dict()
        frames, tokens = cfg.sentence.max_source_frames, cfg.sentence.max_target_tokens
        specs = {(c.stage, s.name): s.shape for c in
                 (stage_contract(st, d) for st in ("st_ctc", "mt_source", "mt_decoder",
                                                   "unit_decoder")) for s in c.states}
        assert specs[("st_ctc", "keys")][2] == frames
        assert specs[("mt_source", "cross_keys")][2] == frames
        assert specs[("mt_decoder", "self_keys")][2] == tokens
        assert specs[("unit_decoder", "t2u_keys")][2] == tokens
        assert specs[("unit_decoder", "cross_keys")][2] == tokens
        assert specs[("unit_decoder", "unit_keys_0")][2] == cfg.unit.upsample * tokens


# ---- the runtime ends the sentence at the capacity ------------------------------------------


@pytest.fixture(scope="module")
def translator(tiny_artifacts_dir) -> Translator:
    """Writes only at sentence ends (a READ stride no CTC count reaches), so the random-weight
    model cannot fill the target side first."""
    return Translator.from_artifacts(tiny_artifacts_dir, deterministic=True,
                                     policy=PolicyConfig(stride_n=10_000, final_max_len=12))


def sentences(events):
    return [e for e in events if isinstance(e, EndOfSentence)]


def test_source_capacity_ends_the_sentence_where_the_next_segment_would_not_fit(translator):
    frames_per_segment = translator.steps_per_segment * translator.segment_length
    segments = translator.source_capacity // frames_per_segment  # whole segments that fit
    cut_frame = segments * 4 * frames_per_segment  # fbank frame where the second sentence starts
    seconds = (cut_frame * 160 + 3 * SR) / SR
    audio = bursts(seconds, seed=7)
    events, stream = translate(translator, audio, 5000)
    ends = sentences(events)
    assert [e.reason for e in ends] == ["source_capacity", "end_of_input"]
    first, last = ends
    assert first.capacity and not last.capacity
    assert last.start_ms == pytest.approx(cut_frame * 10.0)
    # The capacity event comes before anything of the second sentence, after the first one's flush.
    cut = events.index(first)
    assert all(e.source_ms <= events[cut + 1].source_ms for e in events[:cut])
    # The second sentence is a fresh stream fed the audio from its first segment on.
    fresh, _ = translate(translator, audio[cut_frame * 160:], 5000)
    after = events[cut + 1:]
    for kind in (AsrText, TranslationText, SpeechChunk):
        assert ids(after, kind) == ids(fresh, kind), kind.__name__
    assert first.translation_ids and last.translation_ids and ids(after, AsrText)
    end = events[-1]
    assert isinstance(end, EndOfStream)
    assert end.translation_ids == first.translation_ids + last.translation_ids
    assert end.num_samples == first.num_samples + last.num_samples
    assert stream.transcript.sentences == len(ends) and stream.transcript.last == ends[-1]


def test_target_capacity_ends_the_sentence_at_exactly_max_target_tokens(tiny_artifacts_dir):
    translator = Translator.from_artifacts(tiny_artifacts_dir, policy=PolicyConfig(final_max_len=12),
                                           deterministic=True)
    capacity = translator.target_capacity
    events, _ = translate(translator, bursts(9.0, seed=3), 4000)
    ends = sentences(events)
    full = [e for e in ends if e.reason == "target_capacity"]
    assert full, "the random-weight tiny model commits tokens fast enough to fill a sentence"
    for e in ends:
        assert len(e.translation_ids) <= capacity
    for e in full:
        assert len(e.translation_ids) == capacity
