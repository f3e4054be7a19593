"""Emformer encoder: streaming ``step`` == full-utterance ``forward``, mixed-position batches,
input validation, and parity with torchaudio's Emformer (DESIGN §8, reference truth)."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from echostream.contract import encoder_contract
from echostream.config import EncoderConfig, get_preset
from echostream.models.echostream_encoder import EchoStreamEncoder
from echostream.models.state import check_state, random_state
from echostream.models.subsampling import step_window
from echostream.models.torchaudio_import import load_torchaudio_emformer

TOL = 1e-5


def tiny_encoder_cfg(**overrides) -> EncoderConfig:
    return dataclasses.replace(get_preset("tiny").encoder, **overrides)


def make_encoder(cfg: EncoderConfig, seed: int = 0) -> EchoStreamEncoder:
    torch.manual_seed(seed)
    return EchoStreamEncoder(cfg).eval()


def features_for(cfg: EncoderConfig, segments: int, batch: int, seed: int) -> torch.Tensor:
    """Fbank features whose subsampled length is exactly ``N = segments * S + R`` (``4N`` frames:
    every window of the chain lies on real frames)."""
    frames = 4 * (segments * cfg.segment_length + cfg.right_context)
    return torch.randn(batch, frames, cfg.input_dim, generator=torch.Generator().manual_seed(seed))


def window(enc: EchoStreamEncoder, features: torch.Tensor, n: int) -> torch.Tensor:
    """Step ``n``'s window: fbank frames ``4Sn - 3 ..`` (zeros before the utterance and after it)."""
    return step_window(features, n, enc.hop_frames, enc.window_frames)


@torch.no_grad()
def stream(enc: EchoStreamEncoder, features: torch.Tensor, steps: int, state=None, first: int = 0):
    """Chain ``steps`` steps over windows ``first .. first+steps-1`` -> (``[B, steps*S, D]``, state)."""
    state = enc.initial_state(features.shape[0]) if state is None else state
    ys = []
    for n in range(first, first + steps):
        y, state = enc.step(window(enc, features, n), state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


# ---- step == forward -----------------------------------------------------------------------

STREAMING_CONFIGS = {
    "default": dict(memory_size=2, right_context=1, left_context=8),
    "no_memory": dict(memory_size=0, right_context=1, left_context=8),
    "no_right_context": dict(memory_size=2, right_context=0, left_context=8),
    "no_left_context": dict(memory_size=2, right_context=1, left_context=0),
    "nothing": dict(memory_size=0, right_context=0, left_context=0),
    "short_left_tanh": dict(memory_size=3, right_context=2, left_context=3, tanh_on_mem=True),
}


@pytest.mark.parametrize("name", sorted(STREAMING_CONFIGS))
def test_step_chain_equals_forward(name):
    cfg = tiny_encoder_cfg(**STREAMING_CONFIGS[name])
    enc = make_encoder(cfg)
    segments = 12
    features = features_for(cfg, segments, batch=2, seed=1)
    with torch.no_grad():
        out = enc(features)
    full = out["encoder_out"][0]
    assert full.shape == (segments * cfg.segment_length, 2, cfg.d_model)
    assert not out["encoder_padding_mask"][0].any()
    streamed, state = stream(enc, features, segments)
    err = (streamed - full.transpose(0, 1)).abs().max().item()
    assert err <= TOL, f"{name}: step vs forward max abs {err:.2e}"
    assert state["processed_segments"].dtype == torch.int32
    assert state["processed_segments"].tolist() == [segments, segments]


def test_partial_last_segment():
    """T not a multiple of S: forward covers all T frames, and its complete segments (whose
    right context is real look-ahead) equal the step chain."""
    cfg = tiny_encoder_cfg()
    S = cfg.segment_length
    enc = make_encoder(cfg)
    features = features_for(cfg, 10, batch=1, seed=6)
    extra = torch.randn(1, 4 * (S - 1), cfg.input_dim)  # S-1 more encoder frames
    longer = torch.cat([features, extra], dim=1)
    with torch.no_grad():
        full = enc(longer)["encoder_out"][0][:, 0]
    assert full.shape[0] == 10 * S + S - 1
    streamed, _ = stream(enc, longer, 10)
    assert (streamed[0] - full[:10 * S]).abs().max().item() <= TOL
    assert torch.isfinite(full).all()


def test_memory_and_left_context_matter():
    """Guards the parity test against vacuous passes: changing what a segment may see changes
    its output (memory beyond the left context; left context beyond the segment)."""
    features = features_for(tiny_encoder_cfg(), 8, batch=1, seed=2)
    outputs = {}
    for name, over in {"full": {}, "no_mem": dict(memory_size=0), "no_lc": dict(left_context=0)}.items():
        enc = make_encoder(tiny_encoder_cfg(**over))
        with torch.no_grad():
            outputs[name] = enc(features)["encoder_out"][0]
    assert (outputs["full"] - outputs["no_mem"]).abs().max() > 1e-3
    assert (outputs["full"] - outputs["no_lc"]).abs().max() > 1e-3


def test_forward_padded_batch_equals_single_utterances():
    """Utterances of different lengths batched with padding (garbage in the padding) give each
    utterance's own output on its valid frames; mask and lengths mark the rest."""
    cfg = tiny_encoder_cfg()
    enc = make_encoder(cfg)
    segs = [9, 5]
    feats = [features_for(cfg, s, batch=1, seed=10 + s) for s in segs]
    F = feats[0].shape[1]
    padded = torch.randn(2, F, cfg.input_dim) * 5.0
    padded[0] = feats[0][0]
    padded[1, :feats[1].shape[1]] = feats[1][0]
    lengths = torch.tensor([f.shape[1] for f in feats])
    with torch.no_grad():
        batched = enc(padded, lengths)
        singles = [enc(f)["encoder_out"][0][:, 0] for f in feats]
    out, mask = batched["encoder_out"][0], batched["encoder_padding_mask"][0]
    T = [s * cfg.segment_length for s in segs]
    assert batched["encoder_lengths"][0].tolist() == T
    assert mask.sum(dim=1).tolist() == [0, T[0] - T[1]]
    for b in range(2):
        err = (out[:T[b], b] - singles[b]).abs().max().item()
        assert err <= TOL, f"utterance {b}: batched vs alone {err:.2e}"


# ---- streams at different positions ----------------------------------------------------------


def test_batched_streams_at_different_positions_equal_streams_alone():
    cfg = tiny_encoder_cfg(memory_size=2, right_context=1, left_context=6)
    enc = make_encoder(cfg)
    offsets, steps = [0, 3, 7], 4
    feats = [features_for(cfg, off + steps, batch=1, seed=20 + i) for i, off in enumerate(offsets)]
    starts = [stream(enc, f, off)[1] if off else enc.initial_state(1) for f, off in zip(feats, offsets)]
    alone = [stream(enc, f, steps, state=s, first=off) for f, s, off in zip(feats, starts, offsets)]

    state = {k: torch.cat([s[k] for s in starts]) for k in starts[0]}
    assert state["processed_segments"].tolist() == offsets
    ys = []
    with torch.no_grad():
        for n in range(steps):
            x = torch.cat([window(enc, f, off + n) for f, off in zip(feats, offsets)])
            y, state = enc.step(x, state)
            ys.append(y)
    batched = torch.cat(ys, dim=1)
    for b, (y_alone, s_alone) in enumerate(alone):
        err = (batched[b] - y_alone[0]).abs().max().item()
        assert err <= TOL, f"stream {b} (offset {offsets[b]}): batched vs alone {err:.2e}"
        for k in state:
            assert (state[k][b] - s_alone[k][0]).abs().max().item() <= TOL, f"stream {b}: {k}"


def test_random_states_batched_equal_alone():
    """Random caches and counters (including counters past the memory / left-context capacity)."""
    cfg = tiny_encoder_cfg()
    enc = make_encoder(cfg)
    g = torch.Generator().manual_seed(5)
    state = random_state(enc.contract, 4, g, max_counter=12)
    state["processed_segments"] = torch.tensor([0, 1, 3, 11], dtype=torch.int32)
    x = torch.randn(4, enc.window_frames, cfg.input_dim, generator=g)
    with torch.no_grad():
        y, next_state = enc.step(x, state)
        for b in range(4):
            y_b, s_b = enc.step(x[b:b + 1], {k: v[b:b + 1] for k, v in state.items()})
            assert (y[b] - y_b[0]).abs().max().item() <= TOL
            for k in next_state:
                assert torch.allclose(next_state[k][b], s_b[k][0], atol=TOL)
    check_state(enc.contract, next_state, 4)
    # Invalid slots really are masked: garbage there must not change the output of a fresh stream.
    fresh = enc.initial_state(1)
    noisy = {k: (v + 100.0 if v.is_floating_point() else v) for k, v in fresh.items()}
    with torch.no_grad():
        assert torch.allclose(enc.step(x[:1], fresh)[0], enc.step(x[:1], noisy)[0], atol=TOL)


def test_state_follows_contract():
    cfg = tiny_encoder_cfg()
    enc = make_encoder(cfg)
    contract = encoder_contract(get_preset("tiny").to_dict())
    assert [s.name for s in contract.states] == list(enc.initial_state(2))
    _, state = stream(enc, features_for(cfg, 2, batch=2, seed=3), 2)
    check_state(contract, state, 2)
    no_mem = make_encoder(tiny_encoder_cfg(memory_size=0, left_context=0))
    assert list(no_mem.initial_state(1)) == ["processed_segments"]


# ---- bad input -------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    cfg = tiny_encoder_cfg()
    enc = make_encoder(cfg)
    W = enc.window_frames
    state = enc.initial_state(2)
    with pytest.raises(ValueError, match=rf"x expected \[B, {W}, 80\], got \[2, {W}, 40\]"):
        enc.step(torch.randn(2, W, 40), state)
    with pytest.raises(ValueError, match=rf"x expected \[B, {W}, 80\], got \[2, {W + 4}, 80\]"):
        enc.step(torch.randn(2, W + 4, 80), state)
    x = torch.randn(2, W, 80)
    other_names = make_encoder(tiny_encoder_cfg(memory_size=0)).initial_state(2)
    with pytest.raises(ValueError, match=r"state names expected .*memory.*, got"):
        enc.step(x, other_names)
    other_shapes = make_encoder(tiny_encoder_cfg(left_context=4)).initial_state(2)
    with pytest.raises(ValueError, match=r"left_keys shape expected \[2, 2, 8, 32\].*got \[2, 2, 4, 32\]"):
        enc.step(x, other_shapes)
    int64 = dict(state, processed_segments=state["processed_segments"].long())
    with pytest.raises(ValueError, match=r"processed_segments dtype expected torch.int32, got torch.int64"):
        enc.step(x, int64)
    with pytest.raises(ValueError, match=r"shape expected \[3, 2, 2, 32\]"):
        enc.step(torch.randn(3, W, 80), state)  # batch of x and state disagree
    with pytest.raises(ValueError, match=r"features expected \[B, F, 80\]"):
        enc(torch.randn(1, 50, 81))
    with pytest.raises(ValueError, match="lengths expected an integer tensor"):
        enc(torch.randn(2, 50, 80), torch.tensor([50.0, 40.0]))
    with pytest.raises(ValueError, match="at least"):
        enc(torch.randn(1, 4 * enc.cfg.right_context, 80))  # T_sub == R: no output frame
    with pytest.raises(ValueError, match="kind='emformer'"):
        EchoStreamEncoder(get_preset("streamspeech").encoder)


# ---- torchaudio parity ------------------------------------------------------------------------


def _torchaudio_emformer():
    """torchaudio's ``Emformer`` class, or (None, reason).

    ``torchaudio.models.emformer`` is pure PyTorch, but ``import torchaudio`` loads native
    extensions that can fail (the PyPI 2.11 wheel is a CUDA build; a CPU-only torch lacks
    ``libc10_cuda.so``). Then the installed ``emformer.py`` is loaded from the wheel by path.
    """
    try:
        from torchaudio.models import Emformer
        return Emformer, None
    except Exception as exc:  # ImportError, or OSError from the native extension
        reason = f"`from torchaudio.models import Emformer` failed: {type(exc).__name__}: {exc}"
    try:
        spec = importlib.util.find_spec("torchaudio")
    except Exception:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, reason
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "emformer.py"
    try:
        module_spec = importlib.util.spec_from_file_location("_torchaudio_emformer", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.Emformer, None
    except Exception as exc:
        return None, f"{reason}; loading {path} also failed: {type(exc).__name__}: {exc}"


TA_CONFIGS = {
    "default": dict(memory_size=2, right_context=1, left_context=8),
    "no_memory_no_rc": dict(memory_size=0, right_context=0, left_context=8),
    "no_left_tanh_gelu": dict(memory_size=3, right_context=2, left_context=0, tanh_on_mem=True,
                              activation="gelu"),
}


@pytest.mark.parametrize("name", sorted(TA_CONFIGS))
def test_matches_torchaudio_emformer(name):
    Emformer, reason = _torchaudio_emformer()
    if Emformer is None:
        pytest.skip(reason)
    cfg = tiny_encoder_cfg(**TA_CONFIGS[name])
    S, R, D = cfg.segment_length, cfg.right_context, cfg.d_model
    torch.manual_seed(7)
    ta = Emformer(D, cfg.num_heads, cfg.ffn_dim, cfg.num_layers, S, activation=cfg.activation,
                  left_context_length=cfg.left_context, right_context_length=R,
                  max_memory_size=cfg.memory_size, tanh_on_mem=cfg.tanh_on_mem).eval()
    enc = make_encoder(cfg, seed=99)
    load_torchaudio_emformer(enc, ta.state_dict())

    segments, B = 10, 2
    frames = torch.randn(B, segments * S + R, D, generator=torch.Generator().manual_seed(8))
    T = segments * S
    lengths = torch.full((B,), T)
    with torch.no_grad():
        ta_full, _ = ta(frames, lengths)
        ours_full = enc.forward_frames(frames, lengths)
        err = (ours_full - ta_full).abs().max().item()
        assert err <= TOL, f"forward vs torchaudio forward: {err:.2e}"

        ta_states, state, ta_ys, ys = None, enc.initial_state(B), [], []
        for n in range(segments):
            chunk = frames[:, n * S:n * S + S + R]
            y, _, ta_states = ta.infer(chunk, torch.full((B,), S + R), ta_states)
            ta_ys.append(y)
            y, state = enc.step_frames(chunk, state)
            ys.append(y)
    err = (torch.cat(ys, 1) - torch.cat(ta_ys, 1)).abs().max().item()
    assert err <= TOL, f"step chain vs torchaudio infer chain: {err:.2e}"


def test_torchaudio_import_rejects_mismatches():
    enc = make_encoder(tiny_encoder_cfg())
    good = {f"emformer_layers.{i}.{k}": v for i, layer in enumerate(enc.layers)
            for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="keys expected"):
        load_torchaudio_emformer(enc, good)  # our names, not torchaudio's: no emb_to_key_value
    ta_like = {}
    for key, value in good.items():
        if ".attention.k_proj." in key:
            v_key = key.replace("k_proj", "v_proj")
            ta_like[key.replace("k_proj", "emb_to_key_value")] = torch.cat([value, good[v_key]])
        elif ".attention.v_proj." not in key:
            ta_like[key.replace("q_proj", "emb_to_query")] = value
    load_torchaudio_emformer(enc, {"transcriber." + k: v for k, v in ta_like.items()})
    three = dict(ta_like, **{k.replace("layers.1.", "layers.2."): v for k, v in ta_like.items()
                             if "layers.1." in k})
    with pytest.raises(ValueError, match=r"layer count expected 2, got torchaudio layers \[0, 1, 2\]"):
        load_torchaudio_emformer(enc, three)
    key = "emformer_layers.0.pos_ff.1.weight"
    with pytest.raises(ValueError, match=r"pos_ff.1.weight shape expected \[64, 32\], got \[64, 16\]"):
        load_torchaudio_emformer(enc, dict(ta_like, **{key: torch.zeros(64, 16)}))


# ---- full preset -------------------------------------------------------------------------------


@pytest.mark.slow
def test_echostream_preset_step_matches_forward():
    cfg = get_preset("echostream").encoder
    enc = make_encoder(cfg)
    assert len(enc.layers) == 16 and cfg.d_model == 256
    segments = 4
    features = features_for(cfg, segments, batch=1, seed=4)
    with torch.no_grad():
        full = enc(features)["encoder_out"][0][:, 0]
    streamed, state = stream(enc, features, segments)
    check_state(encoder_contract(get_preset("echostream").to_dict()), state, 1)
    assert torch.isfinite(streamed).all()
    assert (streamed[0] - full).abs().max().item() <= TOL
