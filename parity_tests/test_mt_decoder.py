"""MT decoder (stages mt_source + mt_decoder): tokens stepped one by one with source appended
between tokens == the teacher-forced pass with per-token source lengths; fairseq positions; tied
output; batch of streams at different positions; bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from echostream.contract import mt_decoder_contract, mt_source_contract
from echostream.config import get_preset
from echostream.models.decoders.transformer_decoder import TransformerMTDecoder
from echostream.models.state import check_state

ATOL = 1e-5
V, D, E, PAD = 64, 32, 16, 1


def make(max_target_tokens: int = 32, max_source_frames: int = 64) -> TransformerMTDecoder:
    torch.manual_seed(0)
    return TransformerMTDecoder(V, D, layers=2, heads=2, ffn=64, encoder_dim=E,
                                max_target_tokens=max_target_tokens,
                                max_source_frames=max_source_frames, padding_idx=PAD).eval()


def schedule(T: int, seed: int) -> list[int]:
    """Cumulative source frames visible to each of ``T`` tokens (0-4 new frames per token)."""
    rng = np.random.default_rng(seed)
    chunks = rng.integers(0, 5, size=T)
    chunks[0] = max(chunks[0], 1)
    return np.cumsum(chunks).tolist()


def stream(model, tokens: torch.Tensor, source: torch.Tensor, lengths: list[int], ctx=None,
           state=None, done: int = 0):
    """Step ``tokens`` [B, T] one by one, appending ``source`` [B, T_src, E] up to ``lengths[t]``
    before token t (``done`` frames already appended). Returns (log-probs, hidden, ctx, state)."""
    B = tokens.shape[0]
    ctx = model.initial_source_state(B) if ctx is None else ctx
    state = model.initial_state(B) if state is None else state
    log_probs, hidden = [], []
    for t in range(tokens.shape[1]):
        if lengths[t] > done:
            ctx = model.source_step(source[:, done:lengths[t]], ctx)
            done = lengths[t]
        (lp, h), state = model.step(tokens[:, t], ctx, state)
        log_probs.append(lp)
        hidden.append(h)
    return torch.stack(log_probs, 1), torch.stack(hidden, 1), ctx, state


@pytest.mark.parametrize("max_target_tokens,max_source_frames", [(32, 64), (4, 6), (1, 1)])
def test_step_matches_teacher_forced_forward(max_target_tokens, max_source_frames):
    # 14 tokens with small capacities: both FIFOs wrap around.
    model = make(max_target_tokens, max_source_frames)
    T, B = 14, 2
    lengths = schedule(T, seed=max_source_frames)
    tokens = torch.randint(4, V, (B, T), dtype=torch.int32)
    tokens[:, 0] = 2  # </s> starts the target
    source = torch.randn(B, lengths[-1], E)
    with torch.no_grad():
        lp, hidden, ctx, state = stream(model, tokens, source, lengths)
        per_token = torch.tensor(lengths).expand(B, T)
        ref_lp, ref_hidden = model(tokens.long(), source.transpose(0, 1), None, per_token)
    torch.testing.assert_close(lp, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, ref_hidden, atol=ATOL, rtol=0)
    assert state["target_positions"].tolist() == [T] * B
    assert ctx["source_frames"].tolist() == [lengths[-1]] * B
    check_state(model.contract, state, B)
    check_state(model.source_contract, ctx, B)


def test_tiny_preset_contracts():
    cfg = get_preset("tiny")
    model = TransformerMTDecoder.from_config(cfg).eval()
    assert model.contract.states == mt_decoder_contract(cfg.to_dict()).states
    assert model.source_contract.states == mt_source_contract(cfg.to_dict()).states
    with torch.no_grad():
        ctx = model.source_step(torch.randn(3, cfg.encoder.segment_length, cfg.encoder.d_model),
                                model.initial_source_state(3))
        (lp, h), state = model.step(torch.full((3,), cfg.mt.eos, dtype=torch.int32), ctx,
                                    model.initial_state(3))
    assert lp.shape == (3, cfg.ctc.tgt_vocab_size) and h.shape == (3, cfg.mt.d_model)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))


def test_batch_of_streams_at_different_positions():
    model = make(max_target_tokens=5, max_source_frames=7)
    la, lb = schedule(9, seed=1), schedule(4, seed=2)
    ta = torch.randint(4, V, (1, 9), dtype=torch.int32)
    tb = torch.randint(4, V, (1, 4), dtype=torch.int32)
    sa, sb = torch.randn(1, la[-1] + 3, E), torch.randn(1, lb[-1] + 2, E)
    with torch.no_grad():
        _, _, ca, qa = stream(model, ta[:, :8], sa, la)  # A: 8 tokens in
        _, _, cb, qb = stream(model, tb[:, :3], sb, lb)  # B: 3 tokens in
        # Both append more source (different amounts), then one token each.
        ca = model.source_step(sa[:, la[7]:la[7] + 3], ca)
        cb = model.source_step(sb[:, lb[2]:lb[2] + 3], cb)
        (lpa, ha), na = model.step(ta[:, 8], ca, qa)
        (lpb, hb), nb = model.step(tb[:, 3], cb, qb)
        cat = lambda a, b: {k: torch.cat([a[k], b[k]]) for k in a}  # noqa: E731
        (lp, h), n = model.step(torch.cat([ta[:, 8], tb[:, 3]]), cat(ca, cb), cat(qa, qb))
    torch.testing.assert_close(lp, torch.cat([lpa, lpb]), atol=ATOL, rtol=0)
    torch.testing.assert_close(h, torch.cat([ha, hb]), atol=ATOL, rtol=0)
    for k in n:
        torch.testing.assert_close(n[k], torch.cat([na[k], nb[k]]), atol=ATOL, rtol=0)


def test_source_step_appends_per_layer_projections():
    model = make(max_source_frames=6)
    x1, x2 = torch.randn(2, 4, E), torch.randn(2, 4, E)
    with torch.no_grad():
        ctx = model.source_step(x2, model.source_step(x1, model.initial_source_state(2)))
        layer = model.layers[1].encoder_attn
        k = layer.k_proj(torch.cat([x1, x2], 1))[:, -6:]  # newest 6 of 8 frames
    torch.testing.assert_close(ctx["cross_keys"][:, 1], k)
    assert ctx["source_frames"].tolist() == [8, 8]


def fairseq_sinusoid(num_positions: int, dim: int, padding_idx: int) -> np.ndarray:
    """fairseq ``SinusoidalPositionalEmbedding.get_embedding``, written out independently."""
    half = dim // 2
    freq = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
    angles = np.arange(num_positions)[:, None] * freq[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    table[padding_idx] = 0.0
    return table


def test_positions_are_fairseq_sinusoids():
    model = make()
    tokens = torch.tensor([[2, 7, 9, 11, PAD, PAD]])
    index = torch.arange(6).unsqueeze(0)
    got = model.embed_positions(index, tokens)[0].numpy()
    table = fairseq_sinusoid(20, D, PAD)
    # fairseq make_positions on a right-padded row: t + pad + 1 for tokens, padding_idx for pads.
    want = table[[2, 3, 4, 5, PAD, PAD]]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_output_projection_is_tied_to_the_embedding():
    model = make()
    tokens = torch.randint(4, V, (1, 5))
    with torch.no_grad():
        lp, hidden = model(tokens, torch.randn(7, 1, E))
        expected = torch.log_softmax(hidden @ model.embed_tokens.weight.t(), dim=-1)
    torch.testing.assert_close(lp, expected)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    no_output_weights = V * D + count(model.layers) + count(model.layer_norm)
    assert count(model) == no_output_weights, "an output projection besides the embedding exists"


def test_encoder_padding_mask_matches_unpadded_source():
    model = make()
    tokens = torch.randint(4, V, (2, 5))
    source = torch.randn(10, 2, E)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        lp, _ = model(tokens, source, pad)
        alone, _ = model(tokens[1:], source[:6, 1:])
    torch.testing.assert_close(lp[1:], alone, atol=ATOL, rtol=0)


def test_no_source_yet_reads_only_the_newest_slot():
    # source_frames == 0: no row may be fully masked, so the (zero) newest slot is attended and
    # the rest of the cache, whatever it holds, is ignored.
    model = make(max_source_frames=6)
    empty = model.initial_source_state(2)
    garbage = dict(empty, cross_keys=torch.randn_like(empty["cross_keys"]),
                   cross_values=torch.randn_like(empty["cross_values"]))
    garbage["cross_keys"][:, :, -1] = 0.0
    garbage["cross_values"][:, :, -1] = 0.0
    tokens = torch.full((2,), 2, dtype=torch.int32)
    with torch.no_grad():
        (lp, h), _ = model.step(tokens, empty, model.initial_state(2))
        (lp2, h2), _ = model.step(tokens, garbage, model.initial_state(2))
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(h, h2)


def test_bad_input_is_refused():
    model = make()
    ctx = model.source_step(torch.randn(2, 3, E), model.initial_source_state(2))
    state = model.initial_state(2)
    with pytest.raises(ValueError, match="tokens dtype expected torch.int32, got torch.int64"):
        model.step(torch.zeros(2, dtype=torch.int64), ctx, state)
    with pytest.raises(ValueError, match=r"tokens shape expected \[\*\]"):
        model.step(torch.zeros(2, 1, dtype=torch.int32), ctx, state)
    with pytest.raises(ValueError, match="state names expected"):
        model.step(torch.zeros(2, dtype=torch.int32), {"cross_keys": ctx["cross_keys"]}, state)
    with pytest.raises(ValueError, match=r"x shape expected \[\*, \*, 16\]"):
        model.source_step(torch.randn(2, 3, D), ctx)
    with pytest.raises(ValueError, match=r"encoder_out shape expected \[\*, 2, 16\]"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.randn(5, 2, D))
    with pytest.raises(ValueError, match="source_lengths_per_token expected <="):
        model(torch.zeros(2, 3, dtype=torch.long), torch.randn(5, 2, E), None,
              torch.full((2, 3), 6))
    with pytest.raises(ValueError, match="every token must see >= 1 source frame"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.randn(5, 2, E), None,
              torch.tensor([[0, 1, 2], [1, 2, 3]]))
    with pytest.raises(ValueError, match="max_source_frames expected >= 1"):
        make(max_source_frames=0)


@pytest.mark.slow
def test_echostream_preset_step_matches_forward():
    cfg = get_preset("echostream")
    torch.manual_seed(0)
    model = TransformerMTDecoder.from_config(cfg).eval()
    T, S = 6, cfg.encoder.segment_length
    lengths = [S * (t + 1) for t in range(T)]  # one segment per token
    tokens = torch.randint(4, cfg.ctc.tgt_vocab_size, (1, T), dtype=torch.int32)
    source = torch.randn(1, lengths[-1], cfg.encoder.d_model)
    with torch.no_grad():
        lp, hidden, _, _ = stream(model, tokens, source, lengths)
        ref_lp, ref_hidden = model(tokens, source.transpose(0, 1), None,
                                   torch.tensor([lengths]))
    torch.testing.assert_close(lp, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, ref_hidden, atol=ATOL, rtol=0)
