"""The ``exact`` fidelity mode: StreamSpeech's agent, call for call, on the stage graphs.

What the agent computes at a policy call (``models/streamspeech_agent.py`` is the PyTorch
reference written from its code; this module must give the same ids) and how the graphs get
there without re-encoding the prefix:

- **Calls.** One per ``segment_ms`` of *audio* (SimulEval sends a segment, then calls the policy),
  on every sample received up to that point; the call that reaches the end of the input is the
  final one. Call ``k`` therefore runs only once the stream holds more than ``k`` segments of
  samples, or its input is finished.
- **Encoder.** Completed chunks never change (chunk-causal attention and convs), so they are
  encoded once and kept (the sentence's encoder, ST CTC and ``mt_source`` states). The agent's
  fbank prefix at a call ends a couple of frames short of the chunk grid, so its last chunk is
  partial: it is evaluated at every call on a copy of the kept states with the real frame count
  (``valid_frames``), exactly as the agent's full pass computes it, and forgotten afterwards. The
  Emformer has no partial segment: the agent's encoder is then the streaming Emformer itself.
- **CTC.** The ASR and ST hypotheses over all frames: the kept collapses plus the partial chunk.
- **MT.** Re-run at every write from a fresh decoder state over ``[</s>] + prefix`` and on, greedy,
  against the cross-attention K/V of every frame (kept + partial chunk): what the agent's
  ``use_incremental_states=False`` generator computes. The hidden states of that run are D_text.
- **Units.** ``unit_sentence`` (T2U + unit decoder with full cross-attention) over the whole
  text, greedy CTC over every row; units past those already voiced are new.
- **Speech.** The samples whole-sequence synthesis gives the new units (``synthesis.tail``).

Needs host states (ONNX Runtime, torch): the partial chunk's cross K/V are spliced into a copy of
the kept cache on the host.

Symbols: ``C`` encoder frames per chunk, ``K`` cross-cache slots, ``n`` encoder frames of the
partial chunk, ``U`` upsample.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from echostream.contract import sentence_text_states
from echostream.runtime.ctc import greedy_ctc_decode
from echostream.runtime.policy import CtcCounts, greedy_next_token, mt_feed, plan_step
from echostream.runtime.scheduler import Program, StageCall
from echostream.runtime.synthesis import tail

if TYPE_CHECKING:
    from echostream.runtime.stream import Stream
    from echostream.runtime.translator import Translator

NO_CUT = 999999  # the agent's whole-word loop variable when the hypothesis is empty


@dataclass
class AgentBook:
    """One sentence's agent bookkeeping (data): the counts stored by the last READ test that
    passed, the stored target prefix, the last MT input, the units already voiced, and what the
    events have reported so far."""

    src_count: int = 0
    tgt_count: int = 0
    prefix: list[int] | None = None  # tgt_subwords_indices
    last_mt_input: list[int] | None = None  # prev_output_tokens_mt
    voiced: list[int] | None = None  # self.unit
    reported_asr: list[int] = field(default_factory=list)
    reported_translation: list[int] = field(default_factory=list)


@dataclass
class CallOutcome:
    """What one agent call decided: the full ASR hypothesis, the stored translation prefix after
    the call, the newly voiced units and their samples."""

    asr_tokens: list[int]
    translation: list[int]
    new_units: list[int] = field(default_factory=list)
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def agent_call(t: "Translator", stream: "Stream", end: int, finished: bool) -> Program:
    """Program: one agent call on the fbank frames before absolute frame ``end``."""
    s = stream.sentence
    yield from t.commit_encoder(stream, end, finished)
    source = yield from _source(t, stream, end)
    if source is None:
        return CallOutcome(list(s.asr_ctc.tokens), list(s.exact.prefix or []))
    asr, st_count, context = source
    book = s.exact
    out = CallOutcome(asr, list(book.prefix or []))
    plan, stored = plan_step(CtcCounts(len(asr), st_count), CtcCounts(book.src_count, book.tgt_count),
                             len(book.prefix or []), t.policy_config, finished)
    book.src_count, book.tgt_count = stored.asr, stored.st
    if plan is None:
        return out
    max_len = min(plan.max_len, t.target_capacity)
    hypothesis, hidden, mt_state = yield from _generate(t, book.prefix or [], context, max_len)
    finalized = len(hypothesis) + 1  # the finalized hypothesis ends with its </s>
    if t.policy_config.whole_word and not finished:
        cut = _whole_word_cut(hypothesis, t.tgt_vocab.is_word_start)
        if cut == 0:
            return out
        hypothesis = hypothesis[:cut]
        finalized = len(hypothesis)  # cut before a word start: no </s> left
    # prev_output_tokens_mt: [</s>] + hypothesis, padded to the finalized length (+1 whole-word)
    row = [t.eos] + hypothesis
    mt_input = row + [t.pad] * (finalized + (1 if t.policy_config.whole_word else 0) - len(row))
    if book.prefix is not None and book.prefix == hypothesis:
        return out
    book.prefix = hypothesis
    out.translation = list(hypothesis)
    if not finished and book.last_mt_input is not None and (
            mt_input == book.last_mt_input or len(mt_input) <= len(book.last_mt_input)):
        return out
    book.last_mt_input = mt_input
    text_states = hidden[:len(hypothesis) + 1]
    if len(mt_input) > len(text_states):  # the whole-word final input ends with a pad position
        out_pad, _ = yield StageCall("mt_decoder", mt_feed(t.pad, is_pad=True), mt_state, context)
        text_states.append(np.array(out_pad["hidden"][0], copy=True))
    units = yield from _units(t, text_states, len(hypothesis) + 1)
    new = units if book.voiced is None else units[len(book.voiced):]
    if not units or not new:
        return out
    out.new_units = new
    out.samples = yield from tail(t.synthesis, units, len(new))
    book.voiced = units
    return out


# ---- the source of one call ------------------------------------------------------------------


def _source(t: "Translator", stream: "Stream", end: int) -> Program:
    """(ASR tokens, ST token count, mt_source context) over every frame before ``end``: the kept
    states, plus the partial chunk evaluated on copies of them (chunk Conformer). None when the
    sentence has no encoder frame yet."""
    s = stream.sentence
    asr, st = s.asr_ctc, s.st_ctc
    context = s.states["mt_source"]
    rows = t.partial_rows(s, end)
    if rows > 0:
        start = t.window_start(s, s.encoder_steps)
        out, _ = yield StageCall("encoder", t.encoder_inputs(stream, start, end), s.states["encoder"])
        y = out["y"]
        st_out, _ = yield StageCall("st_ctc", {"x": y}, s.states["st_ctc"])
        _, grown = yield StageCall("mt_source", {"x": y}, context)
        asr, st = copy.deepcopy(asr), copy.deepcopy(st)
        asr.accept(out["asr_log_probs"][0, :rows])
        st.accept(st_out["y"][0, :rows])
        context = _keep_newest(context, grown, y.shape[1], rows)
    if s.encoder_steps == 0 and rows <= 0:
        return None
    return list(asr.tokens), st.count, context


def _keep_newest(old: dict, grown: dict, appended: int, rows: int) -> dict:
    """The cross cache with only the first ``rows`` of the ``appended`` frames ``mt_source`` just
    added (the rest of the chunk is padding): the old cache shifted by ``rows`` on the host."""
    if not isinstance(old, dict):
        raise ValueError("the exact fidelity mode needs a backend with host states (onnxruntime, "
                         "torch); this backend keeps its states on the device")
    out = {}
    for name, cache in old.items():
        if cache.ndim < 3:
            continue
        K = cache.shape[2]
        new = grown[name][:, :, K - appended:K - appended + rows]
        out[name] = np.concatenate([cache[:, :, rows:], new], axis=2)
    out["source_frames"] = old["source_frames"] + np.int32(rows)
    return out


# ---- MT, units ---------------------------------------------------------------------------------


def _generate(t: "Translator", prefix: list[int], context: dict, max_len: int) -> Program:
    """The agent's greedy MT, recomputed from a fresh decoder state: ``[</s>] + prefix`` forced,
    then greedy until ``</s>`` (``max_len`` tokens at most, prefix included).

    Returns (hypothesis without ``</s>``, the final-LN state of every fed position, the decoder
    state after the last feed)."""
    state = t.stages["mt_decoder"].initial_state(1)
    tokens, hidden = list(prefix), []
    inputs = [t.eos] + tokens
    for token in inputs:
        out, state = yield StageCall("mt_decoder", mt_feed(token), state, context)
        hidden.append(np.array(out["hidden"][0], copy=True))
    while True:
        token = greedy_next_token(out["y"][0], len(tokens), max_len, t.policy_config, t.eos, t.pad)
        if token == t.eos:
            return tokens, hidden, state
        tokens.append(token)
        out, state = yield StageCall("mt_decoder", mt_feed(token), state, context)
        hidden.append(np.array(out["hidden"][0], copy=True))


def _whole_word_cut(hypothesis: list[int], is_word_start: Callable[[int], bool]) -> int:
    """The agent's loop: the index of the last token that starts a word, 0 if none (and its
    loop variable's initial value when the hypothesis is empty)."""
    j = NO_CUT
    for j in range(len(hypothesis) - 1, -1, -1):
        if is_word_start(hypothesis[j]):
            break
    return j


def _units(t: "Translator", text_states: list[np.ndarray], valid: int) -> Program:
    """Greedy unit CTC over every row of the text states (``valid`` real ones, a pad position
    after them decoded too), full cross-attention."""
    capacity = sentence_text_states(t.cfg)
    x = np.zeros((1, capacity, text_states[0].shape[-1]), np.float32)
    x[0, :len(text_states)] = np.stack(text_states)
    feed = {"x": x, "lengths": np.array([valid], np.int32)}
    out, _ = yield StageCall("unit_sentence", feed)
    rows = out["y"][0, :t.cfg.unit.upsample * len(text_states)]
    u = t.cfg.unit
    classes = greedy_ctc_decode(rows, u.blank, suppress=(t.pad, t.cfg.mt.unk),
                                drop=range(u.unit_offset))
    return [c - u.unit_offset for c in classes]


def torch_call(agent: Any, features: np.ndarray, finished: bool) -> CallOutcome:
    """One call of the PyTorch reference agent (``backend="torch"``) as a :class:`CallOutcome`."""
    out = agent.policy(features, finished)
    return CallOutcome(list(out.asr_tokens), list(out.translation), list(out.new_units),
                       np.asarray(out.samples, np.float32))
