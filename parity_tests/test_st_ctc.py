"""ST CTC head (`CTCDecoderWithTransformerLayer`, stage st_ctc): chunked `step` == full `forward`,
bounded causal window, batch of streams at different positions, padding, bad input."""
from __future__ import annotations

import pytest
import torch

from echostream.contract import st_ctc_contract
from echostream.config import get_preset
from echostream.models.decoders.ctc_decoder import CTCDecoder, CTCDecoderWithTransformerLayer
from echostream.models.state import check_state

ATOL = 1e-5
D, V = 32, 64


def make(layers: int = 2, left_context: int = 8) -> CTCDecoderWithTransformerLayer:
    torch.manual_seed(0)
    return CTCDecoderWithTransformerLayer(D, V, layers, heads=2, ffn=64,
                                          left_context=left_context).eval()


def run_steps(model, x: torch.Tensor, chunk: int, state=None):
    """Feed ``x`` [B, T, D] in chunks of ``chunk`` frames; returns ([B, T, V], final state)."""
    state = model.initial_state(x.shape[0]) if state is None else state
    outs = []
    for start in range(0, x.shape[1], chunk):
        y, state = model.step(x[:, start:start + chunk], state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def full(model, x: torch.Tensor, padding_mask=None) -> torch.Tensor:
    return model(x.transpose(0, 1), padding_mask).transpose(0, 1)


@pytest.mark.parametrize("left_context,chunk", [(8, 4), (3, 4), (5, 1)])
def test_step_matches_forward_over_many_segments(left_context, chunk):
    # 12 segments; capacities below the total length so the FIFO wraps (and chunk > C + 1 once).
    model = make(left_context=left_context)
    x = torch.randn(2, 12 * chunk, D)
    with torch.no_grad():
        streamed, state = run_steps(model, x, chunk)
        reference = full(model, x)
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)
    assert state["processed_frames"].tolist() == [12 * chunk] * 2
    check_state(model.contract, state, 2)


def test_tiny_preset_uses_the_contract_state():
    cfg = get_preset("tiny")
    model = CTCDecoderWithTransformerLayer.from_config(cfg).eval()
    contract = st_ctc_contract(cfg.to_dict())
    assert model.contract.states == contract.states
    x = torch.randn(1, cfg.encoder.segment_length, cfg.encoder.d_model)
    with torch.no_grad():
        y, state = model.step(x, model.initial_state(1))
    assert y.shape == (1, cfg.encoder.segment_length, cfg.ctc.tgt_vocab_size)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.exp().sum(-1), torch.ones(1, cfg.encoder.segment_length))
    check_state(contract, state, 1)


def test_window_is_causal_and_bounded():
    # Output t depends on frames [t - layers * C, t] only: perturb one frame and look.
    layers, C, t0 = 2, 3, 10
    model = make(layers, C)
    x = torch.randn(1, 30, D)
    x2 = x.clone()
    x2[:, t0] += torch.randn(D)  # not a constant shift: LayerNorm would cancel that
    with torch.no_grad():
        changed = (full(model, x) - full(model, x2)).abs().amax(dim=-1)[0] > 1e-6
    assert not changed[:t0].any(), "a frame changed an earlier output (not causal)"
    assert changed[t0:t0 + layers * C + 1].all(), "a frame inside the window had no effect"
    assert not changed[t0 + layers * C + 1:].any(), "a frame outside the left context had effect"


def test_batch_of_streams_at_different_positions():
    model = make(left_context=5)
    xa, xb = torch.randn(1, 28, D), torch.randn(1, 12, D)
    with torch.no_grad():
        _, sa = run_steps(model, xa[:, :24], 4)  # stream A: 6 chunks in (FIFO wrapped)
        _, sb = run_steps(model, xb[:, :8], 4)  # stream B: 2 chunks in
        ya, na = model.step(xa[:, 24:], sa)
        yb, nb = model.step(xb[:, 8:], sb)
        batch_state = {k: torch.cat([sa[k], sb[k]]) for k in sa}
        y, n = model.step(torch.cat([xa[:, 24:], xb[:, 8:]]), batch_state)
    torch.testing.assert_close(y, torch.cat([ya, yb]), atol=ATOL, rtol=0)
    for k in n:
        torch.testing.assert_close(n[k], torch.cat([na[k], nb[k]]), atol=ATOL, rtol=0)


def test_padding_mask_leaves_real_frames_unchanged():
    model = make()
    x = torch.randn(2, 20, D)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 13:] = True
    with torch.no_grad():
        padded = full(model, x, pad)
        alone = full(model, x[1:, :13])
    torch.testing.assert_close(padded[1:, :13], alone, atol=ATOL, rtol=0)
    assert torch.isfinite(padded).all()


def test_zero_layers_is_a_stateless_linear_head():
    model = make(layers=0, left_context=0)
    assert model.contract.states == () and model.initial_state(2) == {}
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        y, state = model.step(x, {})
        expected = torch.log_softmax(model.ctc.proj(x), dim=-1)
    assert state == {}
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(full(model, x), expected)


def test_ctc_decoder_keeps_layout_and_normalises():
    torch.manual_seed(0)
    head = CTCDecoder(D, V).eval()
    x = torch.randn(7, 3, D)
    y = head(x)
    assert y.shape == (7, 3, V) and y.dtype == torch.float32
    torch.testing.assert_close(y.exp().sum(-1), torch.ones(7, 3))
    with pytest.raises(ValueError, match="expected 32"):
        head(torch.randn(7, 3, D + 1))


def test_bad_input_is_refused():
    model = make()
    state = model.initial_state(2)
    with pytest.raises(ValueError, match=r"x shape expected \[\*, \*, 32\]"):
        model.step(torch.randn(2, 4, D + 1), state)
    with pytest.raises(ValueError, match="state names expected"):
        model.step(torch.randn(2, 4, D), {k: v for k, v in state.items() if k != "values"})
    bad = dict(state, processed_frames=state["processed_frames"].long())
    with pytest.raises(ValueError, match="processed_frames dtype expected torch.int32"):
        model.step(torch.randn(2, 4, D), bad)
    with pytest.raises(ValueError, match=r"keys shape expected \[2, 2, 8, 32\]"):
        model.step(torch.randn(2, 4, D), dict(state, keys=torch.zeros(2, 2, 7, D)))
    with pytest.raises(ValueError, match=r"shape expected \[3, 2, 8, 32\]"):
        model.step(torch.randn(3, 4, D), state)  # batch of x and state differ
    with pytest.raises(ValueError, match="left_context expected >= 1"):
        CTCDecoderWithTransformerLayer(D, V, 2, 2, 64, left_context=0)
    with pytest.raises(ValueError, match="padding_mask shape expected"):
        model(torch.randn(5, 2, D), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.slow
def test_echostream_preset_step_matches_forward():
    cfg = get_preset("echostream")
    torch.manual_seed(0)
    model = CTCDecoderWithTransformerLayer.from_config(cfg).eval()
    S = cfg.encoder.segment_length
    x = torch.randn(1, 6 * S, cfg.encoder.d_model)  # 48 frames > left context 32: wraps
    with torch.no_grad():
        streamed, _ = run_steps(model, x, S)
        reference = full(model, x)
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)
