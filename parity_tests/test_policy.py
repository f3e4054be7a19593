"""StreamSpeech's READ/WRITE policy on hand-made CTC counts, the incremental CTC collapse, and the
MT decoder's snapshot rollback (runtime/policy.py, runtime/ctc.py) — no model needed.

The MT stage here is a scripted fake: position j predicts ``oracle[j]`` and refuses any feed that is
out of order (wrong position counter, or an input that is not the token it predicted last), so a
broken rollback fails loudly.
"""
from __future__ import annotations

import numpy as np
import pytest

from echostream.contract import StageContract
from echostream.runtime.ctc import IncrementalCTC, greedy_ctc_decode, text_ctc, unit_ctc
from echostream.runtime.policy import (CtcCounts, MTState, PolicyConfig, PolicyState, WritePlan,
                                       counts_grew, greedy_next_token, plan_step, policy_step,
                                       token_budget, whole_word_keep)
from echostream.runtime.scheduler import drive
from echostream.runtime.stage import Stage

EOS, PAD, UNK = 2, 1, 3
V = 32
WORD_STARTS = frozenset(range(10, 20))  # ids 10..19 play "▁word" pieces, 20..31 continuations


def is_word_start(token: int) -> bool:
    return token in WORD_STARTS


# ---- a scripted MT decoder stage -----------------------------------------------------------------


class ScriptedMT(Stage):
    """Position j predicts ``oracle[j]`` (eos past its end); hidden = [position, input, source]."""

    contract = StageContract("mt_decoder", (), ())

    def __init__(self, oracle):
        self.oracle = list(oracle)
        self.feeds = 0

    def initial_state(self, batch=1):
        return {"target_positions": np.zeros(batch, np.int32),
                "predicted": np.full(batch, -1, np.int32)}

    def run(self, inputs, state=None, context=None):
        self.feeds += 1
        j = int(state["target_positions"][0])
        token = int(inputs["x"][0])
        expected = EOS if j == 0 else int(state["predicted"][0])
        assert token == expected, f"position {j}: fed {token}, the decoder predicted {expected}"
        nxt = self.oracle[j] if j < len(self.oracle) else EOS
        log_probs = np.full((1, V), -10.0, np.float32)
        log_probs[0, nxt] = 0.0
        log_probs[0, PAD] = 5.0  # pad must never win, whatever its score
        source = float(context["source_frames"][0])
        hidden = np.array([[j, token, source]], np.float32)
        next_state = {"target_positions": np.array([j + 1], np.int32),
                      "predicted": np.array([nxt], np.int32)}
        return {"y": log_probs, "hidden": hidden}, next_state


def context(frames: int = 8):
    return {"source_frames": np.array([frames], np.int32)}


class Policy:
    """One sentence's policy data driven against the scripted MT stage (what the translator does
    through its scheduler)."""

    def __init__(self, stage, cfg, capacity=None):
        self.stage, self.cfg = stage, cfg
        self.state = PolicyState(MTState(stage.initial_state(1)), capacity)

    def step(self, counts, ctx, source_finished):
        program = policy_step(self.state, counts, ctx, source_finished, self.cfg, is_word_start,
                              EOS, PAD)
        return drive({"mt_decoder": self.stage}, program)

    @property
    def committed(self):
        return self.state.committed

    @property
    def stored(self):
        return self.state.stored

    @property
    def mt(self):
        return self.state.mt


def make_policy(oracle, segment_ms=320, capacity=None, **cfg):
    cfg = PolicyConfig(segment_ms=segment_ms, **cfg)
    stage = ScriptedMT(oracle)
    return Policy(stage, cfg, capacity), stage


def run_counts(policy, counts, finished_at_end=False):
    """Feed (asr, st) counts one segment at a time; return the committed tokens per step."""
    steps = []
    for i, (asr, st) in enumerate(counts):
        final = finished_at_end and i == len(counts) - 1
        steps.append(policy.step(CtcCounts(asr, st), context(8 * (i + 1)), final).tokens)
    return steps


# ---- 1. READ test and budget ---------------------------------------------------------------------


def test_read_until_both_counts_grow():
    oracle = [21, 22, 23, 24, 25, 26]
    policy, _ = make_policy(oracle)
    steps = run_counts(policy, [(0, 0), (1, 0), (1, 1), (2, 1), (2, 3), (3, 3), (4, 4)])
    #            READ   READ(st)  WRITE 1  READ(st)  WRITE 2  READ(st)  WRITE 1
    assert steps == [[], [], [21], [], [22, 23], [], [24]]
    assert policy.committed == [21, 22, 23, 24]


def test_stride_n_needs_growth_by_n():
    policy, _ = make_policy([21, 22, 23, 24, 25], stride_n=2)
    steps = run_counts(policy, [(1, 1), (2, 2), (3, 3), (4, 5)])
    # (2,2): budget 2 // 2 * 2 = 2; (3,3) grew by 1 only; (4,5): budget 4
    assert steps == [[], [21, 22], [], [23, 24]]


def test_counts_are_stored_even_when_the_budget_reads():
    # lagging_k1 = 1: at (1,1) the counts grew but the budget is 0 -> READ, yet (1,1) is stored,
    # so (1,2) READs because the ASR count did not grow again.
    policy, _ = make_policy([21, 22, 23], lagging_k1=1)
    steps = run_counts(policy, [(1, 1), (1, 2), (2, 2)])
    assert steps == [[], [], [21]]
    assert policy.stored == CtcCounts(2, 2)


def test_pure_decisions():
    cfg = PolicyConfig()
    assert counts_grew(CtcCounts(1, 1), CtcCounts(0, 0), 1)
    assert not counts_grew(CtcCounts(5, 0), CtcCounts(0, 0), 1)
    assert token_budget(3, cfg) == 3
    assert token_budget(3, PolicyConfig(segment_ms=640)) == 4  # whole-word +1
    assert token_budget(5, PolicyConfig(stride_n=2, lagging_k1=0)) == 4
    plan, stored = plan_step(CtcCounts(2, 3), CtcCounts(1, 1), 1, cfg, source_finished=False)
    assert plan == WritePlan(max_len=3, cut_words=False) and stored == CtcCounts(2, 3)
    plan, stored = plan_step(CtcCounts(0, 0), CtcCounts(4, 4), 2, cfg, source_finished=True)
    assert plan == WritePlan(max_len=100, cut_words=False) and stored == CtcCounts(4, 4)


# ---- 2. greedy MT: eos, budget, cap -------------------------------------------------------------


def test_eos_stops_early_and_unchanged_prefix_reads():
    policy, _ = make_policy([21, 22])  # then </s>
    steps = run_counts(policy, [(1, 1), (2, 5), (3, 6)])
    # (2,5): budget 5 - 1 = 4 but </s> after 22 -> commit 1; (3,6): </s> at once -> unchanged: READ
    assert steps == [[21], [22], []]


def test_greedy_next_token_rules():
    cfg = PolicyConfig()
    lp = np.full(V, -5.0, np.float32)
    lp[EOS] = 0.0
    lp[PAD] = 9.0
    assert greedy_next_token(lp, step=3, max_len=10, cfg=cfg, eos=EOS, pad=PAD) == EOS
    lp[7] = -1.0
    # </s> may not be the first target token (fairseq min_len=1); pad never wins
    assert greedy_next_token(lp, step=0, max_len=10, cfg=cfg, eos=EOS, pad=PAD) == 7
    lp[9] = np.nan
    assert greedy_next_token(lp, step=0, max_len=10, cfg=cfg, eos=EOS, pad=PAD) == 7
    # at the length limit only </s> may follow
    assert greedy_next_token(lp, step=10, max_len=10, cfg=cfg, eos=EOS, pad=PAD) == EOS


def test_source_end_decodes_to_eos_with_a_total_cap():
    oracle = [21 + (i % 10) for i in range(300)]  # never says </s>
    policy, _ = make_policy(oracle, final_max_len=12)
    steps = run_counts(policy, [(1, 1), (2, 3), (0, 0)], finished_at_end=True)
    assert steps[:2] == [[21], [22, 23]]
    assert len(policy.committed) == 12  # cap counts the prefix
    assert policy.committed == oracle[:12]
    with pytest.raises(ValueError, match="final step"):
        policy.step(CtcCounts(9, 9), context(), source_finished=True)


# ---- 3. whole-word mode --------------------------------------------------------------------------


def test_whole_word_keep():
    assert whole_word_keep([10, 21, 11, 22], is_word_start) == 2  # cut before the last word
    assert whole_word_keep([10, 21], is_word_start) == 0  # only one (maybe unfinished) word
    assert whole_word_keep([21, 22], is_word_start) == 0  # no word start: READ
    assert whole_word_keep([], is_word_start) == 0


def test_whole_word_mode_commits_complete_words_only():
    # words: [10 21] [11] [12 22 23] [13]
    oracle = [10, 21, 11, 12, 22, 23, 13]
    policy, _ = make_policy(oracle, segment_ms=640)
    steps = run_counts(policy, [(1, 1), (2, 2), (3, 4), (4, 6), (0, 0)], finished_at_end=True)
    # (1,1): budget 2 -> [10 21], only one word -> READ
    # (2,2): budget 3 -> [10 21 11] -> keep [10 21]
    # (3,4): budget 5 -> new [11 12 22] -> keep [11]
    # (4,6): budget 7 -> new [12 22 23 13] -> keep [12 22 23]
    # end: no cut, decode to </s> -> [13]
    assert steps == [[], [10, 21], [11], [12, 22, 23], [13]]


def test_whole_word_never_retracts_committed_tokens():
    # After [10 21] is committed the model changes its mind and continues with continuations only:
    # the agent would shorten its prefix; EchoStream READs and keeps it.
    oracle = [10, 21, 11, 22]
    policy, stage = make_policy(oracle, segment_ms=640)
    assert run_counts(policy, [(1, 1), (2, 2)]) == [[], [10, 21]]
    stage.oracle = [10, 21, 24, 25, 26]
    assert run_counts(policy, [(3, 4)]) == [[]]
    assert policy.committed == [10, 21]


# ---- 4. rollback and text states -----------------------------------------------------------------


def test_rollback_keeps_the_last_committed_token_pending():
    oracle = [10, 21, 11, 22, 12, 23]
    policy, stage = make_policy(oracle, segment_ms=640)
    mt = policy.mt
    run_counts(policy, [(1, 1), (2, 2)])  # committed [10 21]; 11 was speculative
    assert mt.committed == [10, 21]
    assert int(mt.state["target_positions"][0]) == 2  # positions 0 (</s>) and 1 (10) kept
    assert mt.pending_input(EOS) == 21
    # the next attempt feeds 21 at position 2 first; ScriptedMT asserts the order
    run_counts(policy, [(3, 4)])
    assert mt.committed == [10, 21, 11, 22]


def test_capacity_caps_every_hypothesis_and_says_when_full():
    oracle = [21 + (i % 10) for i in range(300)]  # never says </s>
    policy, _ = make_policy(oracle, capacity=5)
    steps = run_counts(policy, [(1, 3), (2, 9)])
    assert steps == [[21, 22, 23], [24, 25]]  # the second budget (9) is cut at the capacity
    assert policy.state.full and len(policy.committed) == 5


def test_text_states_are_n_plus_one_and_each_sent_once():
    oracle = [21, 22, 23, 24, 25]
    policy, _ = make_policy(oracle)
    positions = []
    counts = [(1, 1), (2, 3), (2, 3), (3, 4), (0, 0)]
    for i, (asr, st) in enumerate(counts):
        final = i == len(counts) - 1
        out = policy.step(CtcCounts(asr, st), context(8 * (i + 1)), final)
        positions += [int(h[0]) for h in out.text_states]
        # after every write, states 0..N have been sent (N+1 for N tokens)
        assert positions == list(range(len(policy.committed) + 1)) or not positions
    assert positions == list(range(6))  # 5 tokens -> 6 text states, in order, no repeats


def test_committed_text_state_uses_the_source_of_its_step():
    policy, _ = make_policy([21, 22, 23])
    first = policy.step(CtcCounts(1, 1), context(8), False)
    second = policy.step(CtcCounts(2, 2), context(16), False)
    assert [(h[0], h[2]) for h in first.text_states] == [(0, 8), (1, 8)]
    assert [(h[0], h[2]) for h in second.text_states] == [(2, 16)]


# ---- 5. incremental CTC --------------------------------------------------------------------------


def test_incremental_ctc_equals_whole_sequence_for_any_split():
    rng = np.random.default_rng(0)
    for trial in range(20):
        T = int(rng.integers(1, 60))
        # few classes -> many repeats and blanks, so runs straddle the splits
        labels = rng.integers(0, 5, size=T)
        lp = np.full((T, 8), -9.0, np.float32)
        lp[np.arange(T), labels] = 0.0
        whole = greedy_ctc_decode(lp, blank=0, suppress=(PAD, UNK), drop=(PAD,))
        ctc = IncrementalCTC(blank=0, suppress=(PAD, UNK), drop=(PAD,))
        cuts = sorted(rng.choice(np.arange(T + 1), size=int(rng.integers(0, 6))))
        bounds = [0, *cuts, T]
        pieces = [t for a, b in zip(bounds[:-1], bounds[1:]) for t in ctc.accept(lp[a:b])]
        assert pieces == whole == ctc.tokens
        assert ctc.frames == T


def test_ctc_merges_runs_across_calls_and_splits_at_blanks():
    def frames(*labels):
        lp = np.full((len(labels), 8), -9.0, np.float32)
        lp[np.arange(len(labels)), labels] = 0.0
        return lp

    ctc = IncrementalCTC(blank=0)
    assert ctc.accept(frames(5, 5)) == [5]
    assert ctc.accept(frames(5, 6)) == [6]  # 5 continues the previous call's run
    assert ctc.accept(frames(0, 6)) == [6]  # a blank separates two 6s
    assert ctc.accept(np.zeros((0, 8), np.float32)) == []
    assert ctc.tokens == [5, 6, 6] and ctc.count == 3


def test_ctc_never_picks_pad_or_unk_and_unit_head_drops_specials():
    cfg = {"ctc": {"blank": 0}, "mt": {"pad": 1, "unk": 3},
           "unit": {"blank": 1004, "unit_offset": 4}}
    lp = np.full((4, 1005), -9.0, np.float32)
    lp[0, UNK] = 0.0
    lp[0, 7] = -1.0  # runner-up wins because unk is forced to -inf
    lp[1, PAD], lp[1, 0] = 0.0, -1.0  # pad loses to blank
    lp[2, EOS] = 0.0  # </s>: a text token for the text heads, dropped by the unit head
    lp[3, 1004] = 0.0  # unit blank
    text = text_ctc(cfg)
    assert text.accept(lp[:, :1004]) == [7, EOS]
    units = unit_ctc(cfg)
    assert units.accept(lp) == [7]
    with pytest.raises(ValueError, match="frames, classes"):
        units.accept(np.zeros(5, np.float32))


# ---- 6. the agent's control flow, transliterated, on random count sequences ----------------------


def agent_reference(counts, oracle, cfg: PolicyConfig):
    """StreamSpeech's ``policy()`` control flow with full re-decoding from ``oracle`` (a model whose
    greedy output does not depend on the source); returns the committed tokens after each step."""
    n, k1 = cfg.stride_n, cfg.lagging_k1
    src_len = tgt_len = 0
    committed = None
    trace = []
    for i, (asr, st) in enumerate(counts):
        finished = i == len(counts) - 1
        trace.append(tuple(committed or ()))
        prefix = list(committed or [])
        if not finished:
            if asr < src_len + n or st < tgt_len + n:
                continue
            src_len, tgt_len = max(asr, src_len), max(st, tgt_len)
            subword_tokens = (st - k1) // n * n + (1 if cfg.whole_word else 0)
            new = subword_tokens - len(prefix)
            if new < 1:
                continue
            max_len = len(prefix) + new
        else:
            max_len = cfg.final_max_len
        hyp = list(prefix)
        for step in range(len(prefix), max_len):  # fairseq: </s> forced at step == max_len
            token = oracle[step] if step < len(oracle) else EOS
            if token == EOS:
                break
            hyp.append(token)
        if cfg.whole_word and not finished:
            j = 999999
            for j in range(len(hyp) - 1, -1, -1):
                if is_word_start(hyp[j]):
                    break
            hyp = hyp[:j]
            if j == 0:
                continue
        if committed is not None and hyp == committed:
            continue
        committed = hyp
        trace[-1] = tuple(committed)
    return trace


@pytest.mark.parametrize("seed", range(40))
def test_policy_matches_the_agent_on_random_counts(seed):
    rng = np.random.default_rng(seed)
    cfg = PolicyConfig(segment_ms=int(rng.choice([320, 640, 960])),
                       stride_n=int(rng.choice([1, 1, 2])), lagging_k1=int(rng.choice([0, 0, 1])),
                       final_max_len=int(rng.integers(8, 40)))
    length = int(rng.integers(2, 40))
    oracle = [int(t) for t in rng.integers(10, 32, size=length)]
    if rng.random() < 0.5:
        oracle[int(rng.integers(1, length))] = EOS  # an early end of sentence
    steps = int(rng.integers(1, 30))
    counts = np.cumsum(rng.integers(0, 3, size=(steps, 2)), axis=0)
    counts = [(int(a), int(s)) for a, s in counts] + [(0, 0)]  # the last step: source finished

    knobs = ("segment_ms", "stride_n", "lagging_k1", "final_max_len")
    policy, _ = make_policy(oracle, **{f: getattr(cfg, f) for f in knobs})
    committed, trace = [], []
    for step_tokens in run_counts(policy, counts, finished_at_end=True):
        committed += step_tokens
        trace.append(tuple(committed))
    assert trace == agent_reference(counts, oracle, cfg)
