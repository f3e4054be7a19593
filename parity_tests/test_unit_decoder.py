"""T2U encoder + CTCTransformerUnitDecoder (stage unit_decoder) as StreamSpeech's
(``ctc_unity/modules/ctc_transformer_unit_decoder.py``): the constant positional term, both
cross-attention modes, windows that hold a sentence, text states stepped one by one == the full
pass, the sentence (lengths) pass == the full pass on every prefix, batches of streams, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from echostream.contract import unit_decoder_contract, unit_short_contract
from echostream.config import SentenceConfig, get_preset
from echostream.models.decoders.unit_decoder import CTCTransformerUnitDecoder
from echostream.models.state import check_state
from echostream.runtime.stage import grow_fifo_state, zero_host_state

ATOL = 1e-5
D, K, UP = 32, 1005, 25


def make(text_capacity: int = 16, cross_attention: str = "block_causal",
         seed: int = 0) -> CTCTransformerUnitDecoder:
    torch.manual_seed(seed)
    return CTCTransformerUnitDecoder(D, K, t2u_layers=2, layers=2, heads=2, ffn=64, upsample=UP,
                                     text_capacity=text_capacity,
                                     cross_attention=cross_attention).eval()


def twin(model: CTCTransformerUnitDecoder, **changes) -> CTCTransformerUnitDecoder:
    """The same weights with other window/mode settings."""
    args = dict(text_capacity=model.text_capacity, cross_attention=model.cross_attention)
    args.update(changes)
    other = CTCTransformerUnitDecoder(D, K, t2u_layers=2, layers=2, heads=2, ffn=64, upsample=UP,
                                      **args).eval()
    other.load_state_dict(model.state_dict())
    return other


def stream(model, text: torch.Tensor, state=None):
    """Step ``text`` [B, N, D] one state at a time -> ([B, 25N, K], final state)."""
    state = model.initial_state(text.shape[0]) if state is None else state
    outs = []
    for i in range(text.shape[1]):
        y, state = model.step(text[:, i], state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def fairseq_sinusoid(position: int, dim: int) -> torch.Tensor:
    """fairseq ``SinusoidalPositionalEmbedding.get_embedding`` row ``position``, from its formula."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = position * freq
    return torch.cat([torch.sin(angles), torch.cos(angles)])


def test_constant_positional_term_is_streamspeechs():
    """Every upsampled row gets the sinusoid at padding_idx + 1 = 2 (B = 1 inference)."""
    model = make()
    torch.testing.assert_close(model.position, fairseq_sinusoid(2, D), atol=0, rtol=0)
    # It reaches the output: removing it changes every row.
    text = torch.randn(1, 3, D)
    with torch.no_grad():
        with_pos = model(text)
        model.position.zero_()
        without = model(text)
    assert (with_pos - without).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("text_capacity", [16, 3, 1])
def test_step_matches_forward(text_capacity):
    # 10 text states = 250 unit positions: small capacities wrap every FIFO many times.
    model = make(text_capacity)
    text = torch.randn(2, 10, D)
    with torch.no_grad():
        streamed, state = stream(model, text)
        reference = model(text)
    assert reference.shape == (2, 10 * UP, K)
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)
    assert state["text_positions"].tolist() == [10, 10]
    check_state(model.contract, state, 2)


@pytest.mark.parametrize("mode", ["block_causal", "full"])
def test_sentence_pass_equals_forward_on_every_prefix(mode):
    """forward(text padded to a capacity, lengths) == forward(prefix) on the prefix's rows: what a
    fixed-shape sentence graph computes at each write (the agent re-decodes the whole text)."""
    model = make(6, mode)
    capacity = 7  # text states of a sentence of 6 tokens: </s> + 6
    text = torch.randn(1, capacity, D)
    garbage = torch.randn(1, capacity, D) * 3.0
    with torch.no_grad():
        for n in range(1, capacity + 1):
            padded = torch.cat([text[:, :n], garbage[:, n:]], dim=1)
            got = model(padded, torch.tensor([n]))[:, :n * UP]
            want = model(text[:, :n])
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_full_and_block_causal_differ_only_in_cross_attention():
    model = make()
    full = twin(model, cross_attention="full")
    text = torch.randn(1, 5, D)
    with torch.no_grad():
        # One text state: nothing later to see, the modes agree.
        torch.testing.assert_close(model(text[:, :1]), full(text[:, :1]), atol=ATOL, rtol=0)
        a, b = model(text), full(text)
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no incremental step"):
        full.step(text[:, 0], full.initial_state(1))


def test_text_state_never_changes_earlier_units_when_block_causal():
    model = make()
    text = torch.randn(1, 6, D)
    text2 = text.clone()
    text2[:, 4] = torch.randn(D)
    with torch.no_grad():
        diff = (model(text) - model(text2)).abs().amax(-1)[0]
        diff_full = (twin(model, cross_attention="full")(text)
                     - twin(model, cross_attention="full")(text2)).abs().amax(-1)[0]
    assert diff[:4 * UP].max() == 0.0
    assert (diff[4 * UP:5 * UP] > 1e-6).all()
    assert diff_full[:4 * UP].max() > 1e-6  # full cross-attention: later text changes earlier units


@pytest.mark.parametrize("mode", ["block_causal", "full"])
def test_windows_hold_a_sentence(mode):
    """A sentence of exactly ``text_capacity`` tokens (capacity + 1 text states) equals the
    unbounded module; one more text state makes the window show."""
    cap = 4
    model = make(cap, mode)
    unbounded = twin(model, text_capacity=10_000)
    with torch.no_grad():
        text = torch.randn(1, cap + 1, D)
        torch.testing.assert_close(model(text), unbounded(text), atol=ATOL, rtol=0)
        longer = torch.randn(1, cap + 2, D)
        assert (model(longer) - unbounded(longer)).abs().max() > 1e-4
        if mode == "block_causal":
            streamed, _ = stream(model, text)
            torch.testing.assert_close(streamed, unbounded(text), atol=ATOL, rtol=0)


def test_tiny_preset_contract():
    cfg = get_preset("tiny")
    model = CTCTransformerUnitDecoder.from_config(cfg).eval()
    assert model.contract.states == unit_decoder_contract(cfg.to_dict()).states
    assert model.unit_capacity == cfg.unit.upsample * cfg.sentence.max_target_tokens
    with torch.no_grad():
        y, state = model.step(torch.randn(2, cfg.mt.d_model), model.initial_state(2))
    assert y.shape == (2, cfg.unit.upsample, cfg.unit.num_classes) and y.dtype == torch.float32
    torch.testing.assert_close(y.exp().sum(-1), torch.ones(2, cfg.unit.upsample))
    check_state(model.contract, state, 2)


def test_batch_of_streams_at_different_positions():
    model = make(text_capacity=3)
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
    model = make(text_capacity=4)
    state = model.initial_state(2)
    with pytest.raises(ValueError, match=r"text_state shape expected \[\*, 32\]"):
        model.step(torch.randn(2, 1, D), state)
    with pytest.raises(ValueError, match=r"unit_keys_1 shape expected \[2, 2, 100, 16\]"):
        model.step(torch.randn(2, D), dict(state, unit_keys_1=torch.zeros(2, 2, 99, D // 2)))
    with pytest.raises(ValueError, match="text_positions dtype expected torch.int32"):
        model.step(torch.randn(2, D), dict(state, text_positions=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"text_states shape expected \[\*, \*, 32\]"):
        model(torch.randn(2, D))
    with pytest.raises(ValueError, match="text_capacity expected >= 1"):
        make(text_capacity=0)
    with pytest.raises(ValueError, match="cross_attention expected one of"):
        make(cross_attention="causal")
    cfg = get_preset("tiny")
    cfg.unit.d_model = 64
    with pytest.raises(ValueError, match="d_model expected = mt.d_model 32"):
        CTCTransformerUnitDecoder.from_config(cfg)


def short_then_full(model, text: torch.Tensor, short: int):
    """Step ``text`` on the short graph's caches (``short`` text states), grow them when the
    sentence outgrows them (as the runtime does), then step on the full caches."""
    contract = model.step_contract(short)
    state = {k: torch.from_numpy(v) for k, v in zero_host_state(contract, text.shape[0]).items()}
    outs = []
    for i in range(text.shape[1]):
        if i < short:
            y, state = model.step(text[:, i], state, short)
        else:
            if i == short:
                grown = grow_fifo_state({k: v.numpy() for k, v in state.items()}, model.contract)
                state = {k: torch.from_numpy(v) for k, v in grown.items()}
            y, state = model.step(text[:, i], state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("short", [1, 3, 6])
def test_short_graph_then_grown_caches_equal_the_full_step(short):
    """The short graph (every window ``short`` text states) while the sentence fits, then its
    caches padded on the left into the full step: the same units and the same final state as the
    full step all along (and as the full pass), for a sentence longer than the short window."""
    model = make(text_capacity=8)
    text = torch.randn(2, 11, D)
    with torch.no_grad():
        full, full_state = stream(model, text)
        mixed, mixed_state = short_then_full(model, text, short)
        reference = model(text)
    torch.testing.assert_close(mixed, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed, reference, atol=ATOL, rtol=0)
    for k in full_state:
        torch.testing.assert_close(mixed_state[k], full_state[k], atol=ATOL, rtol=0)


def test_short_graph_past_its_capacity_is_not_the_full_step():
    """Why the runtime grows the caches at the short capacity: a short graph kept beyond it
    slides its windows and forgets the sentence's first text states."""
    model, short = make(text_capacity=8), 2
    text = torch.randn(1, 5, D)
    contract = model.step_contract(short)
    state = {k: torch.from_numpy(v) for k, v in zero_host_state(contract, 1).items()}
    with torch.no_grad():
        full, _ = stream(model, text)
        outs = []
        for i in range(text.shape[1]):
            y, state = model.step(text[:, i], state, short)
            outs.append(y)
    assert (torch.cat(outs, 1) - full).abs().max() > 1e-3


def test_short_contract_and_its_refusals():
    cfg = get_preset("tiny")
    model = CTCTransformerUnitDecoder.from_config(cfg).eval()
    short = unit_short_contract(cfg.to_dict())
    assert short.stage == "unit_decoder_short"
    assert model.step_contract(cfg.sentence.short_target_tokens).states == short.states
    keys = next(spec for spec in short.states if spec.name == "unit_keys_0")
    assert keys.shape[2] == cfg.unit.upsample * cfg.sentence.short_target_tokens
    with pytest.raises(ValueError, match="text_capacity expected 1..32"):
        model.step_contract(33)
    for value in (0, cfg.sentence.max_target_tokens):
        cfg.sentence.short_target_tokens = value
        with pytest.raises(ValueError, match="exports no short unit-decoder graph"):
            unit_short_contract(cfg.to_dict())
    with pytest.raises(ValueError, match="short_target_tokens expected >= 0"):
        SentenceConfig(short_target_tokens=-1)


@pytest.mark.slow
def test_echostream_preset_step_matches_forward():
    cfg = get_preset("echostream")
    torch.manual_seed(0)
    model = CTCTransformerUnitDecoder.from_config(cfg).eval()
    text = torch.randn(1, 18, cfg.mt.d_model)
    with torch.no_grad():
        streamed, _ = stream(model, text)
        reference = model(text)
    torch.testing.assert_close(streamed, reference, atol=ATOL, rtol=0)
