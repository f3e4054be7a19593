"""T2U encoder + CTCTransformerUnitDecoder (stage unit_decoder): text states stepped one by one ==
the full pass; block-causal cross-attention; batch of streams at different positions; bad input."""
from __future__ import annotations

import pytest
import torch

from echostream.contract import unit_decoder_contract
from echostream.models.config import get_preset
from echostream.models.decoders.unit_decoder import CTCTransformerUnitDecoder
from echostream.models.state import check_state

ATOL = 1e-5
D, K, UP = 32, 1005, 25


def make(text_context: int = 16, unit_context: int = 100) -> CTCTransformerUnitDecoder:
    torch.manual_seed(0)
    return CTCTransformerUnitDecoder(D, K, t2u_layers=2, layers=2, heads=2, ffn=64, upsample=UP,
                                     text_context=text_context, unit_context=unit_context).eval()


def stream(model, text: torch.Tensor, state=None):
    """Step ``text`` [B, N, D] one state at a time -> ([B, 25N, K], final state)."""
    state = model.initial_state(text.shape[0]) if state is None else state
    outs = []
    for i in range(text.shape[1]):
        y, state = model.step(text[:, i], state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("text_context,unit_context", [(16, 100), (3, 30), (1, 7)])
def test_step_matches_forward(text_context, unit_context):
    # 10 text states = 250 unit positions: the small capacities wrap both FIFOs many times,
    # and unit_context < 25 exercises the in-step band limit.
    model = make(text_context, unit_context)
    text = torch.randn(2, 10, D)
    with torch.no_grad():
        streamed, state = stream(model, text)
        reference = model(text)
    assert reference.shape == (2, 10 * UP, K)
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)
    assert state["text_positions"].tolist() == [10, 10]
    check_state(model.contract, state, 2)


def test_tiny_preset_contract():
    cfg = get_preset("tiny")
    model = CTCTransformerUnitDecoder.from_config(cfg).eval()
    assert model.contract.states == unit_decoder_contract(cfg.to_dict()).states
    with torch.no_grad():
        y, state = model.step(torch.randn(2, cfg.mt.d_model), model.initial_state(2))
    assert y.shape == (2, cfg.unit.upsample, cfg.unit.num_classes) and y.dtype == torch.float32
    torch.testing.assert_close(y.exp().sum(-1), torch.ones(2, cfg.unit.upsample))
    check_state(model.contract, state, 2)


def test_text_state_never_changes_earlier_units():
    # Block-causal: the units of text state i are final once i is fed.
    model = make()
    text = torch.randn(1, 6, D)
    text2 = text.clone()
    text2[:, 4] = torch.randn(D)
    with torch.no_grad():
        diff = (model(text) - model(text2)).abs().amax(-1)[0]
    assert diff[:4 * UP].max() == 0.0
    assert (diff[4 * UP:5 * UP] > 1e-6).all()


def test_batch_of_streams_at_different_positions():
    model = make(text_context=3, unit_context=30)
    ta, tb = torch.randn(1, 8, D), torch.randn(1, 3, D)
    with torch.no_grad():
        _, sa = stream(model, ta[:, :7])  # A: 7 states in (wrapped)
        _, sb = stream(model, tb[:, :2])  # B: 2 states in
        ya, na = model.step(ta[:, 7], sa)
        yb, nb = model.step(tb[:, 2], sb)
        y, n = model.step(torch.cat([ta[:, 7], tb[:, 2]]),
                          {k: torch.cat([sa[k], sb[k]]) for k in sa})
    torch.testing.assert_close(y, torch.cat([ya, yb]), atol=ATOL, rtol=0)
    for k in n:
        torch.testing.assert_close(n[k], torch.cat([na[k], nb[k]]), atol=ATOL, rtol=0)


def test_bad_input_is_refused():
    model = make()
    state = model.initial_state(2)
    with pytest.raises(ValueError, match=r"text_state shape expected \[\*, 32\]"):
        model.step(torch.randn(2, 1, D), state)
    with pytest.raises(ValueError, match=r"unit_keys shape expected \[2, 2, 100, 32\]"):
        model.step(torch.randn(2, D), dict(state, unit_keys=torch.zeros(2, 2, 99, D)))
    with pytest.raises(ValueError, match="text_positions dtype expected torch.int32"):
        model.step(torch.randn(2, D), dict(state, text_positions=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"text_states shape expected \[\*, \*, 32\]"):
        model(torch.randn(2, D))
    with pytest.raises(ValueError, match="text_context expected >= 1"):
        make(text_context=0)
    cfg = get_preset("tiny")
    cfg.unit.d_model = 64
    with pytest.raises(ValueError, match="d_model expected = mt.d_model 32"):
        CTCTransformerUnitDecoder.from_config(cfg)


@pytest.mark.slow
def test_echostream_preset_step_matches_forward():
    cfg = get_preset("echostream")
    torch.manual_seed(0)
    model = CTCTransformerUnitDecoder.from_config(cfg).eval()
    text = torch.randn(1, 18, cfg.mt.d_model)  # 450 unit positions > unit context 400: wraps
    with torch.no_grad():
        streamed, _ = stream(model, text)
        reference = model(text)
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)
