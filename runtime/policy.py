"""StreamSpeech's simultaneous policy, on an MT decoder that never recomputes its prefix.

The decisions are StreamSpeech's agent (``agent/speech_to_speech.streamspeech.agent.py``,
``policy()``; reference/streamspeech-facts.md §8), written as small pure functions:

1. READ test (source not finished): READ unless *both* the ASR-CTC and the ST-CTC token counts grew
   by at least ``stride_n`` since the counts stored at the last decode attempt; when they did, store
   the new counts (even if this step later READs).
2. Token budget = ``(st_count - lagging_k1) // stride_n * stride_n``, +1 in whole-word mode
   (segment >= 640 ms); new-token limit = budget - committed tokens; READ if < 1.
3. Greedy MT from the committed prefix, at most that many new tokens; ``</s>`` stops early
   (fairseq ``SequenceGenerator``: ``<pad>`` never chosen, ``</s>`` banned as the very first token,
   ``</s>`` forced once the length limit is reached).
4. Whole-word mode, source not finished: cut the hypothesis back to just before its last token
   that starts a word ("▁"); READ if nothing new remains. READ if the committed sequence did not
   change.
5. Source finished: no READ test and no budget; decode to ``</s>`` with at most
   ``final_max_len`` (100, fairseq ``max_len_b``) target tokens in total, prefix included.

One deliberate difference: committed tokens are never retracted. When the whole-word cut would fall
inside the committed prefix (no word start among the new tokens), the agent shortens its stored
prefix and READs; EchoStream READs and keeps the prefix, because its text has already been emitted.

KV-cache semantics (why this is not StreamSpeech's arithmetic, only its policy)
-----------------------------------------------------------------------------
StreamSpeech re-decodes ``[</s>] + prefix`` against *all* source frames received so far at every
step. EchoStream never recomputes the prefix: a committed token's self-attention K/V stay as they
were computed when the token was fed, against the source frames available then. The decisions are
the same rules; the numbers differ (by design, and only where later source frames would change
earlier decoder states).

Positions: input position 0 is ``</s>`` (eos, id 2), input position k is committed token k. With N
tokens committed, the kept decoder state holds positions 0..N-1, and position N's input (the last
committed token, or ``</s>`` when N = 0) is *pending*: every decode attempt feeds it first, against
the current source, to get the next-token log-probs. Greedy decoding then feeds each new token in
turn, snapshotting the state before each feed (a copy request: a backend may reuse buffers).
Speculative tokens that the budget, the whole-word cut or a READ discard are rolled back by
restoring the snapshot taken before the new last committed token M was fed, so that M becomes the
pending input of the next attempt.

Text states for the unit decoder: the MT decoder's ``hidden`` output for input position k is the
text state k. StreamSpeech synthesises N+1 states for N tokens (``[</s>] + tokens``). After a write
of tokens up to M, positions up to M have all been fed during this attempt (position M predicted the
next token, an ``</s>``, or the forced ``</s>`` at the length limit), so states N+1..M (0..M on the
first write) are committed and sent on, each exactly once; position M's K/V is recomputed with more
source on the next attempt, its text state is not re-synthesised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from echostream.runtime.scheduler import Program, StageCall
from echostream.runtime.stage import StageState

WHOLE_WORD_MS = 640  # the agent switches to whole-word commits at segments of 640 ms and more


@dataclass(frozen=True)
class PolicyConfig:
    """The agent's knobs (its command-line defaults)."""

    segment_ms: int = 320
    stride_n: int = 1
    lagging_k1: int = 0
    final_max_len: int = 100  # fairseq max_len_b at source end, prefix included
    min_len: int = 1  # fairseq min_len: </s> may not be the first target token

    def __post_init__(self) -> None:
        if self.stride_n < 1:
            raise ValueError(f"stride_n must be >= 1, got {self.stride_n}")
        if self.lagging_k1 < 0:
            raise ValueError(f"lagging_k1 must be >= 0, got {self.lagging_k1}")
        if self.final_max_len < 1:
            raise ValueError(f"final_max_len must be >= 1, got {self.final_max_len}")

    @property
    def whole_word(self) -> bool:
        return self.segment_ms >= WHOLE_WORD_MS


@dataclass(frozen=True)
class CtcCounts:
    """ASR-CTC and ST-CTC token counts (what the READ test compares)."""

    asr: int = 0
    st: int = 0


@dataclass(frozen=True)
class WritePlan:
    """A decode attempt: generate while the hypothesis is shorter than ``max_len`` tokens
    (prefix included); ``cut_words``: commit whole words only."""

    max_len: int
    cut_words: bool


# ---- pure decisions -----------------------------------------------------------------------------


def counts_grew(now: CtcCounts, stored: CtcCounts, stride_n: int) -> bool:
    """The READ test: both counts grew by at least ``stride_n`` since ``stored``."""
    return now.asr >= stored.asr + stride_n and now.st >= stored.st + stride_n


def token_budget(st_count: int, cfg: PolicyConfig) -> int:
    """Target length the ST-CTC count allows: ``(st - k1) // n * n`` (+1 in whole-word mode)."""
    budget = (st_count - cfg.lagging_k1) // cfg.stride_n * cfg.stride_n
    return budget + 1 if cfg.whole_word else budget


def plan_step(now: CtcCounts, stored: CtcCounts, committed: int, cfg: PolicyConfig,
              source_finished: bool) -> tuple[WritePlan | None, CtcCounts]:
    """Decide READ (``None``) or a decode attempt, and the counts to store.

    Args:
        now: the CTC counts after the newest segment.
        stored: the counts stored at the last decode attempt.
        committed: target tokens committed so far.
        source_finished: the final step (no READ test, no budget).
    Returns:
        (plan or None for READ, the counts to store from now on).
    """
    if source_finished:
        return WritePlan(cfg.final_max_len, cut_words=False), stored
    if not counts_grew(now, stored, cfg.stride_n):
        return None, stored
    stored = CtcCounts(max(now.asr, stored.asr), max(now.st, stored.st))
    new_tokens = token_budget(now.st, cfg) - committed
    if new_tokens < 1:
        return None, stored
    return WritePlan(committed + new_tokens, cut_words=cfg.whole_word), stored


def whole_word_keep(new_tokens: Sequence[int], is_word_start: Callable[[int], bool]) -> int:
    """How many of ``new_tokens`` to commit in whole-word mode: everything before the last token
    that starts a word (that word may still grow). 0 if no new token starts a word."""
    for i in range(len(new_tokens) - 1, -1, -1):
        if is_word_start(new_tokens[i]):
            return i
    return 0


def tokens_to_commit(new_tokens: Sequence[int], plan: WritePlan,
                     is_word_start: Callable[[int], bool]) -> int:
    """Number of the hypothesis' new tokens (``</s>`` excluded) to commit; 0 means READ."""
    if plan.cut_words:
        return whole_word_keep(new_tokens, is_word_start)
    return len(new_tokens)


def greedy_next_token(log_probs: np.ndarray, step: int, max_len: int, cfg: PolicyConfig,
                      eos: int, pad: int) -> int:
    """fairseq's greedy choice for target position ``step`` (tokens already in the hypothesis).

    Args:
        log_probs: ``[V]`` next-token log-probs.
        step: hypothesis length so far, prefix included.
        max_len: at ``step >= max_len`` only ``</s>`` may follow.
    """
    if step >= max_len:
        return eos
    scores = np.where(np.isnan(log_probs), -np.inf, np.asarray(log_probs, dtype=np.float32))
    scores[pad] = -np.inf
    if step < cfg.min_len:
        scores[eos] = -np.inf
    return int(scores.argmax())


# ---- the MT decoder and the policy: data + programs --------------------------------------------


@dataclass
class Hypothesis:
    """One greedy decode attempt from the committed prefix.

    ``tokens``: new tokens (``</s>`` excluded); ``hidden[k]``: text state ``[D]`` of input position
    ``start + k``; ``states[k]``: decoder state before position ``start + k`` was fed (``states[0]``
    is the kept state itself).
    """

    start: int
    tokens: list[int] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)
    states: list[StageState] = field(default_factory=list)


@dataclass
class MTState:
    """One sentence's incremental MT decoding (data, see the module docstring): the committed
    tokens, the decoder ``state`` with positions ``0..N-1`` fed, and how many text states went to
    the unit decoder."""

    state: StageState
    committed: list[int] = field(default_factory=list)
    synthesised: int = 0

    def pending_input(self, eos: int) -> int:
        return self.committed[-1] if self.committed else eos


_NOT_PAD = np.zeros(1, np.int32)
_PAD = np.ones(1, np.int32)


def mt_feed(token: int, is_pad: bool = False) -> dict[str, np.ndarray]:
    """The ``mt_decoder`` data inputs for one token of one stream."""
    return {"x": np.array([token], np.int32), "is_pad": _PAD if is_pad else _NOT_PAD}


def generate(mt: MTState, context: StageState, max_len: int, cfg: PolicyConfig, eos: int,
             pad: int) -> Program:
    """Program: greedy decode from the committed prefix until ``</s>`` (predicted, or forced at
    ``max_len`` tokens, prefix included); returns the :class:`Hypothesis`. Every token of the
    hypothesis gets fed, so its text state exists.

    Args:
        context: the ``mt_source`` state (cross-attention K/V of the source so far).
    """
    start = len(mt.committed)
    hyp = Hypothesis(start)
    # Work on a copy: the kept state must survive a rollback even on a backend that reuses its
    # buffers; later snapshots are copied for the same reason (host backends: no-ops).
    _, state = yield StageCall("mt_decoder", state=mt.state, copy=True)
    token = mt.pending_input(eos)
    while True:
        if hyp.states:
            _, snapshot = yield StageCall("mt_decoder", state=state, copy=True)
        else:
            snapshot = mt.state
        hyp.states.append(snapshot)
        out, state = yield StageCall("mt_decoder", mt_feed(token), state, context)
        hyp.hidden.append(np.array(out["hidden"][0], copy=True))
        token = greedy_next_token(out["y"][0], start + len(hyp.tokens), max_len, cfg, eos, pad)
        if token == eos:
            return hyp
        hyp.tokens.append(token)


def commit(mt: MTState, hyp: Hypothesis, count: int, final: bool = False) -> list[np.ndarray]:
    """Commit the first ``count`` new tokens of ``hyp``; roll the rest back.

    Returns the text states ``[D]`` that became committed (in position order): positions
    ``synthesised..N+count`` on a write or at the final step, none on a READ.
    """
    if not 0 <= count <= len(hyp.tokens):
        raise ValueError(f"count must be in [0, {len(hyp.tokens)}], got {count}")
    if count == 0 and not final:
        return []
    end = hyp.start + count  # position of the new last committed token
    if count:
        # states[count] = before feeding position `end`: it stays the pending input
        mt.state = hyp.states[count]
        mt.committed.extend(hyp.tokens[:count])
    new_states = [hyp.hidden[p - hyp.start]
                  for p in range(max(mt.synthesised, hyp.start), end + 1)]
    mt.synthesised = max(mt.synthesised, end + 1)
    return new_states


@dataclass
class PolicyOutcome:
    """What one policy step produced: committed tokens and their text states (``[D]`` each)."""

    tokens: list[int]
    text_states: list[np.ndarray]


@dataclass
class PolicyState:
    """One sentence's policy bookkeeping (data): the stored CTC counts, the MT decoding, and
    whether the final step was taken. ``capacity``: target tokens a sentence may hold (the
    config's ``max_target_tokens``); no hypothesis grows past it (``</s>`` is forced there)."""

    mt: MTState
    capacity: int | None = None
    stored: CtcCounts = field(default_factory=CtcCounts)
    finished: bool = False

    @property
    def committed(self) -> list[int]:
        return self.mt.committed

    @property
    def full(self) -> bool:
        """The sentence holds ``capacity`` tokens: the next write would not fit."""
        return self.capacity is not None and len(self.committed) >= self.capacity


def policy_step(ps: PolicyState, counts: CtcCounts, context: StageState, source_finished: bool,
                cfg: PolicyConfig, is_word_start: Callable[[int], bool], eos: int,
                pad: int) -> Program:
    """Program: one policy call after a new segment (or the final one at source end); returns
    the :class:`PolicyOutcome`."""
    if ps.finished:
        raise ValueError("the policy already took its final step; a new sentence needs a new "
                         "policy (Stream.reset())")
    plan, ps.stored = plan_step(counts, ps.stored, len(ps.committed), cfg, source_finished)
    if plan is None:
        return PolicyOutcome([], [])
    max_len = plan.max_len if ps.capacity is None else min(plan.max_len, ps.capacity)
    hyp = yield from generate(ps.mt, context, max_len, cfg, eos, pad)
    count = tokens_to_commit(hyp.tokens, plan, is_word_start)
    states = commit(ps.mt, hyp, count, final=source_finished)
    ps.finished = source_finished
    return PolicyOutcome(hyp.tokens[:count], states)
