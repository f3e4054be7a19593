"""Endless streams (issue 14): endpoint rules on hand-made CTC outputs, then a stream of N
sentences with pauses through the real graphs.

The seeded tiny model's ASR head has random weights and emits its prior on silence too, so the
stream tests turn on the endpoint's energy gate (``silence_floor``): encoder frames of digital
silence read as blank, as a trained head's output would (every graph output stays the graph's).

Why it can fail: the trailing-blank count crosses chunk and segment boundaries; an endpoint
decided after a segment must start the next sentence exactly at the next segment (audio after
the endpoint belongs to the next sentence, a token is emitted once, speech is flushed); a
sentence must equal a fresh stream fed its audio; none of it may depend on how audio arrives.
"""
from __future__ import annotations

import numpy as np
import pytest

from echostream.runtime.ctc import IncrementalCTC
from echostream.runtime.endpoint import (DIGITAL_SILENCE_LOG_MEL, EndpointConfig, blank_where,
                                         decide, silent_rows)
from echostream.runtime.events import (AsrText, EndOfSentence, EndOfStream, SpeechChunk,
                                       TranslationText)
from echostream.runtime.policy import PolicyConfig
from echostream.runtime.translator import Translator

from test_chunking_invariance import projection
from test_translator import SR, bursts, ids, translate

RULES = EndpointConfig(after_text_ms=800, no_text_ms=2000, silence_floor=DIGITAL_SILENCE_LOG_MEL)
POLICY = PolicyConfig(final_max_len=10)


# ---- the rules on hand-made CTC outputs ------------------------------------------------------


def frames(*labels, vocab: int = 8) -> np.ndarray:
    lp = np.full((len(labels), vocab), -9.0, np.float32)
    lp[np.arange(len(labels)), labels] = 0.0
    return lp


def test_rules():
    assert decide(800, True, RULES) == "pause"
    assert decide(799, True, RULES) is None
    assert decide(1999, False, RULES) is None
    assert decide(2000, False, RULES) == "silence"
    assert decide(5000, True, RULES) == "pause"
    with pytest.raises(ValueError, match="after_text_ms expected > 0"):
        EndpointConfig(after_text_ms=0)


def test_energy_gate_blanks_only_silent_frames():
    mean, std = np.full(80, 5.0, np.float32), np.full(80, 2.0, np.float32)
    raw = np.full((3 + 4 * 3, 80), 8.0, np.float32)  # lead 3, three encoder frames of 4
    raw[3 + 4:3 + 8] = -15.9  # the second encoder frame is digital silence
    raw[3 + 8:3 + 12] = -15.9
    raw[3 + 11, 7] = 2.0  # one loud bin in the third frame: not silent
    window = (raw - mean) / std
    silent = silent_rows(window, 3, 3, 4, DIGITAL_SILENCE_LOG_MEL, mean, std)
    assert silent.tolist() == [False, True, False]
    logp = frames(3, 5, 6)
    gated = blank_where(logp, silent, blank=0)
    assert gated.argmax(1).tolist() == [3, 0, 6] and np.array_equal(gated[[0, 2]], logp[[0, 2]])
    assert blank_where(logp, np.zeros(3, bool), 0) is logp


def test_trailing_blank_counts_across_chunks():
    ctc = IncrementalCTC(blank=0)
    ctc.accept(frames(0, 0, 5))
    assert ctc.trailing_blank == 0 and ctc.tokens == [5]
    ctc.accept(frames(0, 0))
    ctc.accept(frames(0))
    assert ctc.trailing_blank == 3
    ctc.accept(frames(5, 0))  # a repeat of 5 after blanks is a new token and ends the run
    assert ctc.trailing_blank == 1 and ctc.tokens == [5, 5]
    ctc.accept(np.zeros((0, 8), np.float32))
    assert ctc.trailing_blank == 1


# ---- streams of sentences --------------------------------------------------------------------


def sentences_with_pauses(n: int, pause_s: float = 1.6) -> tuple[np.ndarray, list[int]]:
    """``n`` sentences of bursts separated (and followed) by digital silence; returns the audio
    and where each pause starts (samples)."""
    pieces, pauses, at = [], [], 0
    for i in range(n):
        speech = bursts(1.3 + 0.2 * i, seed=20 + i)
        pieces += [speech, np.zeros(int(pause_s * SR), np.float32)]
        at += len(speech)
        pauses.append(at)
        at += int(pause_s * SR)
    return np.concatenate(pieces), pauses


@pytest.fixture(scope="module")
def translator(tiny_artifacts_dir) -> Translator:
    return Translator.from_artifacts(tiny_artifacts_dir, policy=POLICY, endpoint=RULES,
                                     deterministic=True)


def test_n_sentences_give_n_endpoints_each_equal_to_a_fresh_stream(translator):
    n = 3
    audio, pauses = sentences_with_pauses(n)
    events, stream = translate(translator, audio, 4000)
    ends = [e for e in events if isinstance(e, EndOfSentence)]
    assert [e.reason for e in ends] == ["pause"] * n + ["end_of_input"]
    for end, pause in zip(ends, pauses):  # found in the pause, once its rule was met
        assert pause / 16 < end.source_ms < pause / 16 + 1600
        assert end.translation_ids, "every sentence was translated"
    # every sentence equals a fresh stream fed its own audio (from its first segment on)
    bounds = [0] + [i + 1 for i, e in enumerate(events) if isinstance(e, EndOfSentence)]
    for k, end in enumerate(ends[:n]):
        mine = events[bounds[k]:bounds[k + 1]]
        start = int(round(end.start_ms * 16))
        # up to the next sentence's start, plus the look-ahead its last segment needed
        stop = min(int(round(ends[k + 1].start_ms * 16)) + SR // 2, len(audio))
        fresh, _ = translate(translator, audio[start:stop], 4000)
        first = next(i for i, e in enumerate(fresh) if isinstance(e, EndOfSentence))
        for kind in (AsrText, TranslationText, SpeechChunk):
            assert ids(mine, kind) == ids(fresh[:first + 1], kind), (k, kind.__name__)
        assert fresh[first].reason == "pause"
    # every committed token once, every sample once
    end_of_stream = events[-1]
    assert isinstance(end_of_stream, EndOfStream)
    assert list(end_of_stream.translation_ids) == ids(events, TranslationText)
    assert end_of_stream.num_samples == sum(len(e.samples) for e in events
                                            if isinstance(e, SpeechChunk))


def test_chunking_invariance_holds_across_endpoints(translator):
    audio, _ = sentences_with_pauses(2)
    whole, _ = translate(translator, audio, len(audio))
    for chunk in (777, 16000):
        got, _ = translate(translator, audio, chunk)
        assert projection(got) == projection(whole)


def test_without_the_gate_random_weights_hide_the_pauses(tiny_artifacts_dir):
    ungated = Translator.from_artifacts(tiny_artifacts_dir, policy=POLICY, deterministic=True,
                                        endpoint=EndpointConfig(800, 2000))
    audio, _ = sentences_with_pauses(3)
    events, _ = translate(ungated, audio, 4000)
    assert "pause" not in [e.reason for e in events if isinstance(e, EndOfSentence)]


def test_silence_without_text_restarts_quietly(translator):
    events, _ = translate(translator, np.zeros(6 * SR, np.float32), 8000)
    assert [e.reason for e in events if isinstance(e, EndOfSentence)] == ["end_of_input"]


def test_carry_encoder_and_its_refusals(tiny_artifacts_dir, streamspeech_tiny_artifacts_dir):
    carry = Translator.from_artifacts(
        tiny_artifacts_dir, policy=POLICY,
        endpoint=EndpointConfig(800, 2000, carry_encoder=True, silence_floor=DIGITAL_SILENCE_LOG_MEL))
    audio, _ = sentences_with_pauses(2)
    events, _ = translate(carry, audio, 4000)
    assert [e.reason for e in events if isinstance(e, EndOfSentence)] == ["pause", "pause",
                                                                          "end_of_input"]
    with pytest.raises(ValueError, match="carry_encoder needs the Emformer"):
        Translator.from_artifacts(streamspeech_tiny_artifacts_dir,
                                  endpoint=EndpointConfig(carry_encoder=True))
    with pytest.raises(ValueError, match="endpointing is off in the exact fidelity mode"):
        Translator.from_artifacts(streamspeech_tiny_artifacts_dir, fidelity="exact",
                                  endpoint=RULES)
