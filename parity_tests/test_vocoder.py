"""CodeHiFiGAN + duration predictor: whole-utterance reference vs the windowed stage graphs vs the
torch-free streaming synthesizer (runtime/synthesis.py)."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from echostream.contract import duration_contract, vocoder_contract
from echostream.config import get_preset
from echostream.models.decoders.vocoder import (
    CodeHiFiGAN, duration_context, durations_from_log, receptive_field)
from echostream.runtime.synthesis import StreamingSynthesizer
from echostream.runtime.synthesis import durations_from_log as np_durations_from_log


class TorchStage:
    """Minimal stateless Stage adapter over a CodeHiFiGAN step method (local to these tests)."""

    def __init__(self, fn, contract):
        self.fn, self.contract, self.calls = fn, contract, 0

    def run(self, inputs, state=None, context=None):
        x = inputs["x"]
        spec = self.contract.spec("x")
        assert x.dtype == np.int32 and x.shape == spec.concrete_shape(1), (x.dtype, x.shape)
        self.calls += 1
        with torch.no_grad():
            y = self.fn(torch.from_numpy(x))
        return {"y": y.numpy()}, None


def build(preset: str, seed: int = 0):
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = CodeHiFiGAN(cfg.vocoder).eval()
    return cfg, model


def synthesizer(cfg, model):
    d = cfg.to_dict()
    return StreamingSynthesizer(TorchStage(model.duration_step, duration_contract(d)),
                                TorchStage(model.vocoder_step, vocoder_contract(d)), d)


def random_units(n: int, num_units: int, seed: int) -> np.ndarray:
    """Deduplicated random unit codes (no two neighbours equal), as a CTC collapse gives."""
    rng = np.random.default_rng(seed)
    units = [int(rng.integers(num_units))]
    while len(units) < n:
        u = int(rng.integers(num_units))
        if u != units[-1]:
            units.append(u)
    return np.array(units, dtype=np.int64)


def stream(synth: StreamingSynthesizer, units: np.ndarray, sizes) -> np.ndarray:
    out, i = [], 0
    for size in sizes:
        out.append(synth.push(units[i:i + size]))
        i += size
    assert i >= len(units)
    out.append(synth.flush())
    return np.concatenate(out)


def random_sizes(n: int, seed: int, high: int = 7):
    rng = np.random.default_rng(seed)
    sizes, total = [], 0
    while total < n:
        sizes.append(int(rng.integers(0, high + 1)))  # 0: an empty push must be harmless
        total += sizes[-1]
    return sizes


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These convs are small; on a shared 2-core box, intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


# ---- sizes and contracts -------------------------------------------------------------------


def test_full_config_size_and_receptive_field():
    cfg = get_preset("echostream").vocoder
    model = CodeHiFiGAN(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 13.3e6 < n < 13.7e6, n  # streamspeech-facts §7: ~13.5 M
    assert cfg.hop_length == 320
    assert receptive_field(cfg) == (21, 21)
    assert duration_context(cfg) == 2


@pytest.mark.parametrize("preset", ["tiny", "echostream", "streamspeech"])
def test_config_windows_cover_receptive_field(preset):
    """The shipped windows make streaming exact: context >= receptive field on both sides."""
    v = get_preset(preset).vocoder
    left, right = receptive_field(v)
    assert v.window_left >= left and v.window_right >= right, (receptive_field(v), v)
    assert v.duration_window > 2 * duration_context(v)


def test_receptive_field_matches_gradient(tiny):
    """The analytic receptive field is exactly the set of frames with a non-zero gradient."""
    cfg, model = tiny
    frames, f = 40, 20
    emb = torch.randn(1, frames, cfg.vocoder.embedding_dim, requires_grad=True)
    wav = model.generate(emb, None)
    wav[0, f * 320:(f + 1) * 320].sum().backward()
    touched = emb.grad[0].abs().sum(-1).nonzero().flatten()
    assert (f - int(touched.min()), int(touched.max()) - f) == receptive_field(cfg.vocoder)


def test_output_length_is_hop_per_frame(tiny):
    cfg, model = tiny
    units = torch.tensor([[3, 9, 1, 500, 7]])
    durations = torch.tensor([[1, 4, 2, 1, 3]])
    with torch.no_grad():
        wav = model(units, durations)
        assert wav.shape == (1, 11 * 320)
        predicted = model.predict_durations(units)
        assert model(units).shape == (1, int(predicted.sum()) * 320)


def test_step_shapes_follow_contract(tiny):
    cfg, model = tiny
    d = cfg.to_dict()
    for contract, fn in ((duration_contract(d), model.duration_step),
                         (vocoder_contract(d), model.vocoder_step)):
        x = torch.randint(-1, 1000, contract.spec("x").concrete_shape(2), dtype=torch.int32)
        with torch.no_grad():
            y = fn(x)
        assert tuple(y.shape) == contract.spec("y").concrete_shape(2)
        assert y.dtype == torch.float32


# ---- durations -----------------------------------------------------------------------------


def test_duration_rounding_rule():
    # exp(d) - 1 = 0.4, 0.5, 1.5, 2.5, 3.49, -0.9  ->  max(1, round half to even)
    raw = np.array([0.4, 0.5, 1.5, 2.5, 3.49, -0.9, 6.6], dtype=np.float64)
    log_dur = np.log1p(raw).astype(np.float32)
    expected = [1, 1, 2, 2, 3, 1, 7]
    assert durations_from_log(torch.from_numpy(log_dur)).tolist() == expected
    assert np_durations_from_log(log_dur).tolist() == expected
    # The numpy (runtime) and torch (reference) rules agree on a dense grid.
    grid = np.linspace(-3, 4, 20001, dtype=np.float32)
    np.testing.assert_array_equal(np_durations_from_log(grid),
                                  durations_from_log(torch.from_numpy(grid)).numpy())
    with pytest.raises(ValueError, match="non-finite"):
        np_durations_from_log(np.array([0.0, np.nan], dtype=np.float32))


def test_windowed_duration_matches_whole_sequence(tiny):
    cfg, model = tiny
    wd, c = cfg.vocoder.duration_window, duration_context(cfg.vocoder)
    units = torch.from_numpy(random_units(19, 1000, seed=1)).unsqueeze(0)
    with torch.no_grad():
        ref = model.predict_log_durations(units)[0]
        # Every interior window: positions with c real units each side match exactly.
        for start in range(-c, units.shape[1] - c):
            ids = torch.full((1, wd), -1, dtype=torch.int32)
            lo, hi = max(start, 0), min(start + wd, units.shape[1])
            ids[0, lo - start:hi - start] = units[0, lo:hi].int()
            got = model.duration_step(ids)[0]
            for j in range(wd):
                pos = start + j
                inside = 0 <= pos < units.shape[1]
                seen = (j >= c or pos - j <= 0) and (j < wd - c or pos + (wd - j) >= units.shape[1])
                if inside and seen:
                    torch.testing.assert_close(got[j], ref[pos], rtol=0, atol=1e-5)
                if not inside:
                    assert got[j] == 0  # -1 positions output 0
        # A short utterance inside one window (-1 on both sides) is the whole-sequence result.
        short = units[:, :5]
        ids = torch.full((1, wd), -1, dtype=torch.int32)
        ids[0, 2:7] = short[0].int()
        torch.testing.assert_close(model.duration_step(ids)[0, 2:7],
                                   model.predict_log_durations(short)[0], rtol=0, atol=1e-5)


# ---- windowed vocoder and -1 handling ------------------------------------------------------


def test_vocoder_minus_one_is_utterance_boundary(tiny):
    cfg, model = tiny
    v = cfg.vocoder
    w = v.window_left + v.window_chunk + v.window_right
    frames = torch.tensor([4, 4, 8, 15, 15, 15, 16, 23, 42, 42])
    with torch.no_grad():
        ref = model(frames.unsqueeze(0), torch.ones(1, len(frames), dtype=torch.long))[0]
        ids = torch.full((1, w), -1, dtype=torch.int32)
        ids[0, 3:3 + len(frames)] = frames.int()
        got = model.vocoder_step(ids)[0]
        torch.testing.assert_close(got[3 * 320:(3 + len(frames)) * 320], ref, rtol=0, atol=1e-5)
        assert torch.all(got[:3 * 320] == 0) and torch.all(got[(3 + len(frames)) * 320:] == 0)
        silent = model.vocoder_step(torch.full((1, w), -1, dtype=torch.int32))
        assert torch.all(silent == 0)


def test_batched_forward_equals_per_row(tiny):
    cfg, model = tiny
    units = torch.tensor([[5, 6, 7], [8, 9, 10]])
    durations = torch.tensor([[2, 1, 3], [1, 1, 1]])
    with torch.no_grad():
        batch = model(units, durations)
        assert batch.shape == (2, 6 * 320)
        for b in range(2):
            row = model(units[b:b + 1], durations[b:b + 1])[0]
            n = row.shape[0]
            torch.testing.assert_close(batch[b, :n], row, rtol=0, atol=1e-5)
            assert torch.all(batch[b, n:] == 0)


def test_bad_inputs_raise(tiny):
    cfg, model = tiny
    with pytest.raises(ValueError, match="0..999"):
        model(torch.tensor([[1, 1000]]))
    with pytest.raises(ValueError, match="durations shape"):
        model(torch.tensor([[1, 2]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=">= 1"):
        model(torch.tensor([[1, 2]]), torch.tensor([[1, 0]]))
    synth = synthesizer(cfg, model)
    with pytest.raises(ValueError, match="0..999"):
        synth.push([3, -1])
    with pytest.raises(ValueError, match="vocoder stage expected input x"):
        other = with_windows(tiny, 8, 5, 8, 8)[0].to_dict()
        StreamingSynthesizer(synth._duration_stage, synth._vocoder_stage, other)
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        synth.push(np.array([1.0, 2.0]))


# ---- streaming synthesis -------------------------------------------------------------------


def check_streaming_matches_whole(preset_model, n_units: int, seed: int, max_abs: float | None,
                                  min_snr: float = 30.0):
    cfg, model = preset_model
    units = random_units(n_units, cfg.vocoder.num_units, seed)
    with torch.no_grad():
        whole = model(torch.from_numpy(units).unsqueeze(0))[0].numpy()
    synth = synthesizer(cfg, model)
    streamed = stream(synth, units, random_sizes(n_units, seed))
    assert streamed.dtype == np.float32
    assert streamed.shape == whole.shape
    snr = snr_db(whole, streamed)
    print(f"\n{cfg.name}: {n_units} units, {len(whole) / 16000:.2f} s, streamed vs whole "
          f"SNR {snr:.1f} dB, max |diff| {np.abs(whole - streamed).max():.2e}")
    assert snr >= min_snr
    if max_abs is not None:
        assert np.abs(whole - streamed).max() <= max_abs
    assert synth.num_units == n_units
    assert synth.num_frames * 320 == synth.num_samples == len(whole)
    return streamed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_matches_whole_sequence_tiny(tiny, seed):
    check_streaming_matches_whole(tiny, n_units=60, seed=seed, max_abs=1e-5)


def with_windows(preset_model, left: int, chunk: int, right: int, duration_window: int):
    """Same weights, other stream windows (windows shape only the stage graphs, not the model)."""
    cfg, model = preset_model
    cfg = copy.deepcopy(cfg)
    cfg.vocoder.window_left, cfg.vocoder.window_chunk = left, chunk
    cfg.vocoder.window_right, cfg.vocoder.duration_window = right, duration_window
    return cfg, model


@pytest.mark.parametrize("left,chunk,right,dur_window", [
    (11, 3, 9, 5),  # context longer than what has been voiced for several chunks
    (8, 16, 8, 32),  # a chunk longer than the context, wide duration window
    (9, 1, 8, 6),  # one frame per call
])
def test_streaming_exact_for_other_windows(tiny, left, chunk, right, dur_window):
    check_streaming_matches_whole(with_windows(tiny, left, chunk, right, dur_window),
                                  n_units=30, seed=5, max_abs=1e-5)


def test_streaming_with_short_look_ahead_is_close(tiny):
    """window_right below the receptive field trades exactness for latency (documented)."""
    check_streaming_matches_whole(with_windows(tiny, 8, 4, 3, 8), n_units=30, seed=6,
                                  max_abs=None, min_snr=40.0)


def test_streaming_matches_whole_sequence_full():
    """The full 13.5 M-parameter vocoder, ~1.1 s of audio (a few seconds on one core)."""
    check_streaming_matches_whole(build("echostream", seed=3), n_units=50, seed=3, max_abs=1e-5)


def test_chunking_invariance(tiny):
    cfg, model = tiny
    units = random_units(45, 1000, seed=7)
    one_by_one = stream(synthesizer(cfg, model), units, [1] * len(units))
    all_at_once = stream(synthesizer(cfg, model), units, [len(units)])
    random_split = stream(synthesizer(cfg, model), units, random_sizes(len(units), seed=8, high=11))
    np.testing.assert_array_equal(one_by_one, all_at_once)
    np.testing.assert_array_equal(one_by_one, random_split)


def test_streaming_emits_whole_chunks_with_bounded_buffers(tiny):
    cfg, model = tiny
    v = cfg.vocoder
    synth = synthesizer(cfg, model)
    units = random_units(80, 1000, seed=11)
    emitted = 0
    for u in units:
        out = synth.push([u])
        assert len(out) % (v.window_chunk * 320) == 0
        emitted += len(out)
        # Only the context that is still needed is kept between calls.
        assert synth.pending_units <= duration_context(v)
        assert synth.pending_frames < v.window_chunk + v.window_right
    assert emitted == synth.num_samples > 0
    voc_calls = synth._vocoder_stage.calls
    tail = synth.flush()
    assert len(tail) == synth.num_samples - emitted
    assert synth.num_frames * 320 == synth.num_samples
    # One vocoder call per chunk of frames: ceil(frames / chunk) in total.
    assert synth._vocoder_stage.calls == -(-synth.num_frames // v.window_chunk)
    assert synth._vocoder_stage.calls > voc_calls


def test_flush_starts_a_new_utterance_and_reset_clears(tiny):
    cfg, model = tiny
    synth = synthesizer(cfg, model)
    a, b = random_units(12, 1000, seed=21), random_units(9, 1000, seed=22)
    first = stream(synth, a, [5, 7])
    second = stream(synth, b, [9])
    np.testing.assert_array_equal(second, stream(synthesizer(cfg, model), b, [9]))
    assert synth.num_units == 21 and synth.num_samples == len(first) + len(second)
    assert len(synth.flush()) == 0  # nothing pending
    synth.reset()
    assert (synth.num_units, synth.num_frames, synth.num_samples) == (0, 0, 0)
    np.testing.assert_array_equal(stream(synth, a, [12]), first)


def test_runtime_synthesis_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; "
            "import echostream.runtime.synthesis as s; "
            "assert not any(m.startswith('echostream.models') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
