"""Streaming fbank (runtime, kaldi-native-fbank) vs the torch Kaldi-fbank reference, and streaming
invariances.

Both sides compute in fp32. Measured here:
- synthetic speech-like audio: raw log-mel max |diff| ~1.3e-4; after global CMVN <= ~5e-5;
- espeak-ng speech (digital silence, resampled): raw max |diff| up to ~3.6e-3, but only in mel bins
  90-100 dB below their frame's loudest bin, where both fp32 FFTs are ~1e-2 off a float64
  computation (rounding noise; the trained model sees the same noise from torchaudio). Within 60 dB
  of the frame peak the raw |diff| is <= ~1.6e-4 and <= ~1e-4 after CMVN; the 99.9th percentile
  over all bins after CMVN is < 1e-4.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from echostream.config import get_preset
from echostream.contract import fbank_frame_count
from echostream.models.features import (
    apply_global_cmvn,
    frame_sizes,
    kaldi_fbank,
    mel_banks,
)
from echostream.runtime.audio import StreamingResampler, read_audio
from echostream.runtime.features import FeatureStream

CFG = get_preset("tiny").to_dict()["features"]
RAW_TOL = 1e-2  # fp32 floor in bins ~100 dB below the frame peak (see the module docstring)
CMVN_TOL = 1e-4
INFORMATIVE_DB = 60.0  # bins within this range of their frame's loudest bin


def _speech_like(seconds: float, seed: int, level: float) -> np.ndarray:
    """Voiced harmonics with a gliding pitch, a syllable envelope, digital silence and a noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 110 + 40 * seed + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(h * phase) / h for h in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 2.1 * t), 0, None) ** 2
    x = level * envelope * voiced + 0.003 * level * rng.standard_normal(t.size)
    x[int(0.4 * x.size):int(0.45 * x.size)] = 0.0
    return x.astype(np.float32)


def _runtime(x: np.ndarray, mean=None, std=None) -> np.ndarray:
    fs = FeatureStream(CFG, mean, std)
    fs.accept_waveform(x)
    fs.input_finished()
    return fs.frames(0, fs.num_frames)


def _compare(utterances: list[np.ndarray]) -> dict[str, float]:
    """Runtime vs reference with global CMVN stats over all utterances (as gcmvn is computed)."""
    refs = [kaldi_fbank(torch.from_numpy(x), CFG) for x in utterances]
    stacked = torch.cat(refs)
    mean, std = stacked.mean(0), stacked.std(0)
    raw_all, cmvn_all, cmvn_informative = [], [], []
    for x, ref in zip(utterances, refs):
        raw = _runtime(x)
        assert raw.shape == tuple(ref.shape)
        normed = _runtime(x, mean.numpy(), std.numpy())
        ref_raw, ref_normed = ref.numpy(), apply_global_cmvn(ref, mean, std).numpy()
        informative = ref_raw >= ref_raw.max(1, keepdims=True) - INFORMATIVE_DB / 10 * np.log(10)
        raw_all.append(np.abs(raw - ref_raw).ravel())
        cmvn_diff = np.abs(normed - ref_normed)
        cmvn_all.append(cmvn_diff.ravel())
        cmvn_informative.append(cmvn_diff[informative])
    raw_all, cmvn_all = np.concatenate(raw_all), np.concatenate(cmvn_all)
    return {"raw_max": float(raw_all.max()), "cmvn_max": float(cmvn_all.max()),
            "cmvn_p999": float(np.percentile(cmvn_all, 99.9)),
            "cmvn_informative_max": float(np.concatenate(cmvn_informative).max())}


def test_runtime_matches_torch_reference_speech_like():
    d = _compare([_speech_like(2.0, s, lvl) for s, lvl in ((0, 0.3), (1, 0.05), (2, 0.6))])
    assert d["raw_max"] <= 1e-3 and d["cmvn_max"] <= CMVN_TOL, d


@pytest.mark.skipif(shutil.which("espeak-ng") is None,
                    reason="espeak-ng not installed (apt-get install -y espeak-ng) for real speech")
def test_runtime_matches_torch_reference_espeak(tmp_path):
    utterances = []
    for voice, text in (("fr", "Bonjour, je m'appelle Jean et j'habite à Paris depuis dix ans."),
                        ("es", "El tren sale de la estación a las ocho de la mañana.")):
        wav = tmp_path / f"{voice}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True,
                       capture_output=True)
        samples, rate = read_audio(wav)
        utterances.append(StreamingResampler(rate).process(samples, last=True))
    d = _compare(utterances)
    assert d["raw_max"] <= RAW_TOL, d
    assert d["cmvn_informative_max"] <= CMVN_TOL and d["cmvn_p999"] <= CMVN_TOL, d


def test_streaming_in_random_pieces_equals_one_pass():
    x = _speech_like(3.0, 3, 0.3)
    rng = np.random.default_rng(0)
    mean, std = rng.normal(10, 2, 80).astype(np.float32), rng.uniform(2, 5, 80).astype(np.float32)
    whole = _runtime(x, mean, std)
    fs, i, seen = FeatureStream(CFG, mean, std), 0, []
    while i < len(x):
        n = int(rng.integers(0, 700))  # pieces shorter and longer than a 400-sample window
        fs.accept_waveform(x[i:i + n])
        i += n
        seen.append(fs.num_frames)
    fs.input_finished()
    assert seen == sorted(seen) and fs.num_frames == len(whole)
    np.testing.assert_array_equal(fs.frames(0, fs.num_frames), whole)


def test_frame_count_snip_edges():
    window, shift, fft = frame_sizes(CFG)
    assert (window, shift, fft) == (400, 160, 512)
    for n in (0, 399, 400, 559, 560, 16000):
        fs = FeatureStream(CFG, None, None)
        fs.accept_waveform(np.zeros(n, np.float32))
        before = fs.num_frames
        fs.input_finished()
        expected = 0 if n < 400 else 1 + (n - 400) // 160
        assert fs.num_frames == before == fbank_frame_count(n, window, shift) == expected
        assert kaldi_fbank(torch.zeros(n), CFG).shape == (fs.num_frames, 80)


def test_discard_keeps_numbering_and_values():
    x = _speech_like(2.0, 4, 0.3)
    whole = _runtime(x)
    fs = FeatureStream(CFG, None, None)
    fs.accept_waveform(x[:16000])
    fs.discard_before(50)
    assert fs.first_frame == 50
    with pytest.raises(ValueError, match="discarded"):
        fs.frames(49, 60)
    fs.accept_waveform(x[16000:])
    fs.discard_before(120)
    fs.discard_before(100)  # never un-discards
    assert fs.first_frame == 120 and fs.num_frames == len(whole)
    np.testing.assert_array_equal(fs.frames(120, fs.num_frames), whole[120:])
    with pytest.raises(ValueError, match="only"):
        fs.discard_before(fs.num_frames + 1)


def test_long_stream_bounded_by_discard():
    """Two minutes in 1 s pieces, discarding as an encoder would: only a window is ever held."""
    fs = FeatureStream(CFG, None, None)
    block = _speech_like(1.0, 5, 0.3)
    for _ in range(120):
        fs.accept_waveform(block)
        fs.discard_before(max(fs.first_frame, fs.num_frames - 200))
        assert fs.num_frames - fs.first_frame <= 200
    assert fs.num_frames == fbank_frame_count(120 * 16000, 400, 160)
    assert fs.frames(fs.first_frame, fs.num_frames).shape == (200, 80)


def test_reference_fbank_is_a_mel_spectrum():
    banks = mel_banks(80, 512, 16000)
    assert banks.shape == (80, 257) and torch.all(banks[:, -1] == 0) and torch.all(banks.sum(1) > 0)
    t = torch.arange(16000) / 16000
    for hz in (300.0, 2000.0):
        feats = kaldi_fbank(0.5 * torch.sin(2 * torch.pi * hz * t), CFG)
        peak_bin = int(feats.mean(0).argmax())
        # the loudest filter is the one whose centre (in mel) is nearest the tone
        centre = (banks * torch.arange(257)).sum(1) / banks.sum(1) * 16000 / 512
        assert abs(float(centre[peak_bin]) - hz) < 0.1 * hz
    silence = kaldi_fbank(torch.zeros(1600), CFG)
    assert torch.allclose(silence, torch.full_like(silence, float(np.log(np.finfo(np.float32).eps))))


def test_bad_input_is_a_clear_value_error():
    fs = FeatureStream(CFG, None, None)
    with pytest.raises(ValueError, match=r"mono samples \[n\]"):
        fs.accept_waveform(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="float samples"):
        fs.accept_waveform(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fs.accept_waveform(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match=r"expected 0 <= start <= end <= 0"):
        fs.frames(0, 1)
    fs.input_finished()
    with pytest.raises(ValueError, match="after input_finished"):
        fs.accept_waveform(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match=r"CMVN stats must be \[80\]"):
        FeatureStream(CFG, np.zeros(40), np.ones(40))
    with pytest.raises(ValueError, match="std > 0"):
        FeatureStream(CFG, np.zeros(80), np.zeros(80))
    with pytest.raises(ValueError, match="needs 'num_mel_bins'"):
        FeatureStream({"sample_rate": 16000, "frame_length_ms": 25, "frame_shift_ms": 10}, None, None)
    with pytest.raises(ValueError, match=r"mono samples \[N\]"):
        kaldi_fbank(torch.zeros(2, 400), CFG)
