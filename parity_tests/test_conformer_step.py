"""The chunk Conformer's streaming ``step`` (models/conformer_encoder.py): chained steps equal the
chunk-masked full pass (320 / 640 / 960 ms chunks, partial last chunk included), streams at
different positions batch exactly, the counter alone decides what is valid, bad input is refused.
Configs are ``streamspeech_tiny``'s encoder (d 32, 2 layers, kernel 7) at each chunk size."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from echostream.config import get_preset
from echostream.models.conformer_encoder import ChunkConformerEncoder
from echostream.models.state import random_state
from echostream.models.subsampling import step_window

TOL = 1e-5
CAPACITY = 96  # encoder frames a sentence holds in these tests (a small K keeps them fast)


def make_encoder(chunk: int, preset: str = "streamspeech_tiny", capacity: int = CAPACITY,
                 seed: int = 0) -> ChunkConformerEncoder:
    """Seeded encoder in eval mode with non-trivial BatchNorm statistics."""
    cfg = dataclasses.replace(get_preset(preset).encoder, chunk_size=chunk)
    torch.manual_seed(seed)
    enc = ChunkConformerEncoder(cfg, capacity).eval()
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return enc


def features(batch: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, frames, 80, generator=torch.Generator().manual_seed(seed))


def feed(enc: ChunkConformerEncoder, feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk ``k``'s window (2 frames before the chunk, zeros outside the utterance) and its valid
    fbank frames, for every row of ``feats`` ``[B, F, 80]`` (rows share F)."""
    hop = enc.hop_frames
    x = step_window(feats, k, hop, enc.fbank_window, enc.subsample.lead)
    valid = torch.full((feats.shape[0],), min(hop, feats.shape[1] - k * hop), dtype=torch.int32)
    return x, valid


@torch.no_grad()
def chain(enc: ChunkConformerEncoder, feats: torch.Tensor, state=None, first: int = 0,
          steps: int | None = None):
    """Chained steps over chunks ``first ..`` -> (``[B, steps * C, D]``, state)."""
    hop = enc.hop_frames
    steps = -(-feats.shape[1] // hop) - first if steps is None else steps
    state = enc.initial_state(feats.shape[0]) if state is None else state
    ys = []
    for k in range(first, first + steps):
        y, state = enc.step(*feed(enc, feats, k), state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


# ---- chained steps == the chunk-masked full pass -------------------------------------------------


@pytest.mark.parametrize("chunk", [8, 16, 24])
def test_chained_steps_equal_the_full_pass(chunk):
    """5 chunks then a partial one (a third of its fbank frames): every step emits what the
    chunk-masked pass computes -- the full pass over the utterance for C = 8, 16, and at C = 24
    (two chunks per block) the pass over the prefix ending at that chunk, which is the full pass at
    every block end."""
    enc = make_encoder(chunk)
    hop, C = enc.hop_frames, chunk
    frames = 5 * hop + hop // 3
    feats = features(1, frames, seed=chunk)
    streamed, state = chain(enc, feats)
    T = (frames - 1) // 4 + 1
    assert streamed.shape[1] == 6 * C and T == 5 * C + -(-(hop // 3) // 4)
    with torch.no_grad():
        full = enc.encode_prefix(feats[0])["encoder_out"][0][:, 0]  # [T, D]
        want = enc.chunk_outputs(feats[0])
    err = (streamed[0, :T] - want).abs().max().item()
    assert err <= TOL, f"C={C}: steps vs chunk-masked pass max abs {err:.2e}"
    assert state["processed_chunks"].tolist() == [6]
    final = [k for k in range(6) if enc.block_chunks == 1 or k % 2 == 1 or k == 5]
    for k in final:  # block ends (and the utterance end) equal the full pass
        got = streamed[0, k * C:min((k + 1) * C, T)]
        assert (got - full[k * C:(k + 1) * C]).abs().max() <= TOL, (C, k)
    if enc.block_chunks == 2:  # guard: the provisional chunks really are provisional
        assert (want[:C] - full[:C]).abs().max() > 1e-2


def test_partial_last_chunk_equals_the_shorter_sentence():
    """Every partial length of the last chunk (1 .. 4C-1 fbank frames) computes what the full pass
    over that shorter sentence computes on its valid frames; frames past them are not compared."""
    enc = make_encoder(8)
    hop = enc.hop_frames
    base = features(1, 3 * hop, seed=3)
    _, state = chain(enc, base[:, :2 * hop])
    for extra in (1, 2, 3, 5, 17, hop - 1):
        feats = base[:, :2 * hop + extra]
        with torch.no_grad():
            y, _ = enc.step(*feed(enc, feats, 2), state)
            want = enc.encode_prefix(feats[0])["encoder_out"][0][2 * 8:, 0]
        n = want.shape[0]
        assert n == -(-extra // 4)
        assert (y[0, :n] - want).abs().max() <= TOL, extra


def test_first_chunk_of_a_block_is_what_the_agent_sees():
    """C = 24: the step for chunk 2 (a block's first) equals StreamSpeech re-encoding the prefix of
    3 chunks at that call, and so does chunk 1 (a block end); chunk 0 as the agent saw it one call
    earlier is what it was then, not what this prefix makes of it."""
    enc = make_encoder(24)
    feats = features(1, 6 * enc.hop_frames, seed=4)
    streamed, _ = chain(enc, feats, steps=3)
    with torch.no_grad():
        agent = enc.encode_prefix(feats[0, :3 * enc.hop_frames])["encoder_out"][0][:, 0]
    assert (streamed[0, 24:] - agent[24:]).abs().max() <= TOL
    assert (streamed[0, :24] - agent[:24]).abs().max() > 1e-2


# ---- batching and state -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [8, 24])
def test_streams_at_different_positions_batch_like_alone(chunk):
    """Three utterances warmed up to chunks 0, 1 and 3 (different block positions at C = 24),
    then stepped together, the last step with different valid counts: each row == it alone."""
    enc = make_encoder(chunk)
    hop = enc.hop_frames
    utts = [features(1, 8 * hop, seed=20 + i) for i in range(3)]
    warm = (0, 1, 3)
    states = [chain(enc, u, steps=w)[1] if w else enc.initial_state(1) for u, w in zip(utts, warm)]
    batched = {k: torch.cat([s[k] for s in states]) for k in states[0]}
    for step in range(3):
        xs, vs = zip(*(feed(enc, u, w + step) for u, w in zip(utts, warm)))
        x, v = torch.cat(xs), torch.cat(vs)
        if step == 2:
            v = torch.tensor([hop, 5, hop // 2 + 1], dtype=torch.int32)
        with torch.no_grad():
            y_b, batched = enc.step(x, v, batched)
            for i in range(3):
                y_i, states[i] = enc.step(x[i:i + 1], v[i:i + 1], states[i])
                assert (y_b[i:i + 1] - y_i).abs().max() <= TOL, (step, i)
                for name, value in states[i].items():
                    assert (batched[name][i:i + 1] - value).abs().max() <= TOL, (step, i, name)
    assert batched["processed_chunks"].tolist() == [w + 3 for w in warm]


@pytest.mark.parametrize("chunk", [8, 24])
def test_a_fresh_counter_ignores_whatever_the_state_holds(chunk):
    """Random caches and contexts with the counter at 0 (and garbage in the window's lead) give
    exactly the zero state's chain: validity comes from the counter alone."""
    enc = make_encoder(chunk)
    feats = features(2, 4 * enc.hop_frames, seed=5)
    zero, zero_state = chain(enc, feats)
    state = random_state(enc.contract, 2, torch.Generator().manual_seed(6))
    state["processed_chunks"] = torch.zeros(2, dtype=torch.int32)
    x, v = feed(enc, feats, 0)
    x[:, :enc.subsample.lead] = 7.0  # frames "before the sentence"
    with torch.no_grad():
        y0, state = enc.step(x, v, state)
    rest, state = chain(enc, feats, state, first=1)
    assert torch.equal(torch.cat([y0, rest], dim=1), zero)
    # A random counter is a different position: the same audio gives other frames.
    other = random_state(enc.contract, 2, torch.Generator().manual_seed(7))
    moved, _ = chain(enc, feats, other)
    assert torch.isfinite(moved).all() and (moved - zero).abs().max() > 1e-2


def test_the_cache_reaches_the_start_of_the_sentence():
    """Full-history attention: perturbing the first chunk's audio changes the last chunk's output
    (the K/V cache, not a bounded left context, carries it)."""
    enc = make_encoder(8)
    feats = features(1, 10 * enc.hop_frames, seed=8)
    other = feats.clone()
    other[:, :16] += 1.0
    a, _ = chain(enc, feats)
    b, _ = chain(enc, other)
    assert (a[0, -8:] - b[0, -8:]).abs().max() > 1e-3


# ---- validation --------------------------------------------------------------------------------


def test_bad_step_inputs_are_refused():
    enc = make_encoder(8)
    state = enc.initial_state(1)
    x, v = feed(enc, features(1, 64, seed=9), 0)
    with pytest.raises(ValueError, match=r"x expected \[B, 34, 80\], got \[1, 33, 80\]"):
        enc.step(x[:, 1:], v, state)
    with pytest.raises(ValueError, match="valid_frames dtype expected torch.int32"):
        enc.step(x, v.long(), state)
    with pytest.raises(ValueError, match="state names expected"):
        enc.step(x, v, {k: s for k, s in state.items() if k != "conv_context"})
    wrong = dict(state, keys=torch.zeros(1, 2, CAPACITY + 1, 32))
    with pytest.raises(ValueError, match=r"keys shape expected \[1, 2, 96, 32\]"):
        enc.step(x, v, wrong)
    with pytest.raises(ValueError, match="chunk_size 20 cannot stream"):
        make_encoder(20).initial_state(1)


def test_contract_shapes():
    from echostream.config import SentenceConfig
    from echostream.contract import encoder_contract

    enc = make_encoder(24)
    preset = get_preset("streamspeech_tiny")
    cfg = dataclasses.replace(preset, encoder=enc.cfg,
                              sentence=SentenceConfig(max_source_frames=CAPACITY))
    contract = encoder_contract(cfg)
    assert enc.contract.states == contract.states  # the module's own specs are the stage's
    shapes = {s.name: s.shape for s in contract.inputs}
    assert shapes == {
        "x": ("B", 2 + 96, 80), "valid_frames": ("B",),
        "keys": ("B", 2, CAPACITY, 32), "values": ("B", 2, CAPACITY, 32),
        "subsample_context": ("B", 2, 8), "conv_context": ("B", 2, 3, 32),
        "block_frames": ("B", 24, 32), "processed_chunks": ("B",),
    }
    assert "block_frames" not in make_encoder(8).contract.state_names
    assert [s.name for s in contract.outputs][:2] == ["y", "asr_log_probs"]


# ---- the released dims --------------------------------------------------------------------------


@pytest.mark.slow
def test_streamspeech_encoder_step_equals_forward():
    """The full ``streamspeech`` encoder (12 layers, d 256, kernel 31, K = 750) at C = 8: 12 chunks
    and a partial one, chained steps == the full pass."""
    enc = make_encoder(8, preset="streamspeech", capacity=750)
    hop = enc.hop_frames
    feats = features(1, 12 * hop + 9, seed=10)
    streamed, _ = chain(enc, feats)
    with torch.no_grad():
        full = enc.encode_prefix(feats[0])["encoder_out"][0][:, 0]
    err = (streamed[0, :full.shape[0]] - full).abs().max().item()
    assert err <= TOL, f"streamspeech C=8: max abs {err:.2e}"
