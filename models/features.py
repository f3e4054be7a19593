"""Kaldi-compatible log-mel filterbank in plain torch: the feature reference for export and training.

StreamSpeech computes its input with ``torchaudio.compliance.kaldi.fbank`` at its defaults on
samples scaled to the int16 range (``waveform * 2**15``; fairseq ``extract_fbank_features``).
torchaudio is not a dependency here, so this module re-implements those exact defaults:

    80 mel bins, 25 ms window / 10 ms shift at 16 kHz (400 / 160 samples), snip_edges (only whole
    windows), dither 0, remove DC offset per frame, pre-emphasis 0.97 (first sample replicated),
    povey window (Hann^0.85), FFT size rounded up to a power of two (512), power spectrum, Kaldi mel
    banks (mel = 1127 ln(1 + f/700), triangles in mel, 20 Hz .. Nyquist), log with a floor of
    float32 eps. ``use_energy`` is off (as StreamSpeech), so the energy floor never applies.

The runtime computes the same features without torch (``runtime/features.py`` on
kaldi-native-fbank); ``parity_tests/test_features.py`` holds the two together.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from echostream.contract import fbank_frame_count, fbank_window_shift

INT16_SCALE = 32768.0  # StreamSpeech: waveform * 2**15 before fbank
PREEMPHASIS = 0.97
POVEY_POWER = 0.85
LOW_FREQ_HZ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi/torchaudio floor before the log


def frame_sizes(feature_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """(window, shift, fft) sizes in samples for a ``features`` config section.

    ``feature_cfg`` keys: ``sample_rate``, ``frame_length_ms``, ``frame_shift_ms`` (as
    ``FeatureConfig``). The FFT size is the window rounded up to a power of two.
    """
    window, shift = fbank_window_shift(feature_cfg["sample_rate"], feature_cfg["frame_length_ms"],
                                       feature_cfg["frame_shift_ms"])
    if window <= 0 or shift <= 0:
        raise ValueError(f"frame length/shift must be > 0 samples, got {window}/{shift}")
    return window, shift, 1 << (window - 1).bit_length()


def povey_window(window: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's povey window [window]: a symmetric Hann window raised to 0.85."""
    n = torch.arange(window, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (window - 1))
    return hann.pow(POVEY_POWER).to(dtype)


def mel_scale(freq: torch.Tensor) -> torch.Tensor:
    """Kaldi (HTK-style natural-log) mel scale."""
    return 1127.0 * torch.log1p(freq / 700.0)


def mel_banks(num_bins: int, fft_size: int, sample_rate: int,
              low_freq: float = LOW_FREQ_HZ, high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi triangular mel filters [num_bins, fft_size // 2 + 1] (last column, Nyquist, is zero).

    ``high_freq <= 0`` means Nyquist + high_freq (Kaldi's convention). Triangles are linear in mel
    between equally spaced mel points; computed in float64 and returned in float32.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high_freq}")
    num_fft_bins = fft_size // 2
    mel_low, mel_high = mel_scale(torch.tensor(low_freq, dtype=torch.float64)), mel_scale(
        torch.tensor(high_freq, dtype=torch.float64))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = mel_scale(torch.arange(num_fft_bins, dtype=torch.float64) * sample_rate / fft_size)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    # Kaldi's bins cover [0, fft/2); the Nyquist bin gets weight zero.
    return torch.nn.functional.pad(banks, (0, 1)).to(torch.float32)


def kaldi_fbank(samples: torch.Tensor, feature_cfg: Mapping[str, Any],
                scale: float = INT16_SCALE) -> torch.Tensor:
    """Log-mel filterbank of a mono waveform.

    Args:
        samples: [N] float waveform nominally in [-1, 1] (16 kHz for the presets).
        feature_cfg: the config's ``features`` section (``sample_rate``, ``num_mel_bins``,
            ``frame_length_ms``, ``frame_shift_ms``).
        scale: multiplied in before anything else (StreamSpeech's int16 range).
    Returns:
        [T, num_mel_bins] float32, T = ``fbank_frame_count(N, window, shift)`` (may be 0).
    """
    if samples.dim() != 1:
        raise ValueError(f"expected mono samples [N], got shape {tuple(samples.shape)}")
    window, shift, fft_size = frame_sizes(feature_cfg)
    n_mels = int(feature_cfg["num_mel_bins"])
    t = fbank_frame_count(samples.shape[0], window, shift)
    if t == 0:
        return samples.new_zeros((0, n_mels), dtype=torch.float32)
    x = samples.to(torch.float32) * scale
    frames = x.as_strided((t, window), (shift, 1))  # [T, window], snip_edges framing
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC offset
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # replicate the first sample
    frames = (frames - PREEMPHASIS * previous) * povey_window(window)
    spectrum = torch.fft.rfft(frames, n=fft_size)  # zero-padded to the power of two
    power = spectrum.real.square() + spectrum.imag.square()  # [T, fft/2 + 1]
    banks = mel_banks(n_mels, fft_size, int(feature_cfg["sample_rate"]))
    mel = power @ banks.t()  # [T, n_mels]
    return torch.clamp(mel, min=LOG_FLOOR).log()


def apply_global_cmvn(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """fairseq ``GlobalCMVN``: ``(features - mean) / std``, per mel bin.

    Args:
        features: [..., F] log-mel features.
        mean, std: [F] statistics (std > 0).
    Returns:
        [..., F] normalised features.
    """
    if mean.shape != features.shape[-1:] or std.shape != features.shape[-1:]:
        raise ValueError(f"CMVN stats must be [{features.shape[-1]}], got mean {tuple(mean.shape)}, "
                         f"std {tuple(std.shape)}")
    return (features - mean) / std
