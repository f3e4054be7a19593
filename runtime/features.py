"""Streaming fbank + global CMVN for the runtime, on kaldi-native-fbank (no torch).

Computes the same features as the torch reference ``echostream.models.features.kaldi_fbank``
(StreamSpeech's ``torchaudio.compliance.kaldi.fbank`` defaults on int16-scaled samples), but
incrementally: samples arrive in any split, frames are numbered from the start of the stream, and
frames the encoder no longer needs are discarded so memory stays bounded over hour-long streams.

With snip_edges every frame is a whole window of samples already received, so ``input_finished``
adds no frames and streaming in any split equals one pass exactly.
"""
from __future__ import annotations

from typing import Any, Mapping

import kaldi_native_fbank as knf
import numpy as np

from echostream.config import FeatureConfig

INT16_SCALE = 32768.0  # StreamSpeech scales [-1, 1] samples to the int16 range before fbank
LOW_FREQ_HZ = 20.0


def fbank_options(feature_cfg: Mapping[str, Any]) -> knf.FbankOptions:
    """kaldi-native-fbank options equal to torchaudio's Kaldi fbank defaults (dither 0).

    ``feature_cfg``: the config's ``features`` section (``sample_rate``, ``num_mel_bins``,
    ``frame_length_ms``, ``frame_shift_ms``).
    """
    feature_cfg = as_feature_config(feature_cfg)
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq = float(feature_cfg.sample_rate)
    frame.frame_length_ms = float(feature_cfg.frame_length_ms)
    frame.frame_shift_ms = float(feature_cfg.frame_shift_ms)
    frame.dither = 0.0  # knf defaults to 3e-5; the reference is deterministic
    frame.preemph_coeff = 0.97
    frame.remove_dc_offset = True
    frame.window_type = "povey"
    frame.round_to_power_of_two = True
    frame.snip_edges = True
    mel = opts.mel_opts
    mel.num_bins = int(feature_cfg.num_mel_bins)
    mel.low_freq = LOW_FREQ_HZ
    mel.high_freq = 0.0  # Nyquist
    opts.use_energy = False
    opts.energy_floor = 1.0  # torchaudio's default; unused while use_energy is off
    opts.raw_energy = True
    opts.htk_compat = False
    opts.use_log_fbank = True
    opts.use_power = True
    return opts


class FeatureStream:
    """Incremental log-mel fbank with global CMVN for one audio stream.

    Frames are indexed from the start of the stream (frame ``t`` covers samples
    ``[t * shift, t * shift + window)``). Frames before ``first_frame`` have been discarded.

    Example::

        fs = FeatureStream(cfg["features"], mean, std)
        fs.accept_waveform(samples)            # [n] float32 at 16 kHz, any n
        x = fs.frames(0, fs.num_frames)        # [T, 80] normalised
        fs.discard_before(t)                   # free frames the encoder has consumed
    """

    def __init__(self, feature_cfg: Mapping[str, Any], cmvn_mean: np.ndarray | None,
                 cmvn_std: np.ndarray | None):
        self._opts = fbank_options(feature_cfg)
        feature_cfg = as_feature_config(feature_cfg)
        self.sample_rate = int(feature_cfg.sample_rate)
        self.num_mel_bins = int(feature_cfg.num_mel_bins)
        self._mean, self._std = _check_cmvn(cmvn_mean, cmvn_std, self.num_mel_bins)
        self._fbank = knf.OnlineFbank(self._opts)
        self._first = 0
        self._finished = False
        self._num_samples = 0
        # Normalised frames [first_frame, num_frames), fetched from the fbank once each.
        self._buffer = np.empty((64, self.num_mel_bins), dtype=np.float32)
        self._held = 0  # rows of _buffer in use

    # ---- input ---------------------------------------------------------------------------------

    def accept_waveform(self, samples: np.ndarray) -> None:
        """Append samples [n] (float, nominally [-1, 1]) at ``sample_rate``."""
        if self._finished:
            raise ValueError("FeatureStream.accept_waveform called after input_finished()")
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples [n], got shape {samples.shape}")
        if samples.size == 0:
            return
        if not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"expected float samples in [-1, 1], got dtype {samples.dtype}")
        if not np.all(np.isfinite(samples)):
            raise ValueError("samples contain NaN or Inf")
        scaled = np.ascontiguousarray(samples, dtype=np.float32) * np.float32(INT16_SCALE)
        self._fbank.accept_waveform(float(self.sample_rate), scaled)
        self._num_samples += samples.size
        self._fetch()

    def _fetch(self) -> None:
        """Move the fbank's new frames into the normalised buffer (each frame once)."""
        ready = self.num_frames - self._first
        if ready <= self._held:
            return
        if ready > len(self._buffer):
            grown = np.empty((max(ready, 2 * len(self._buffer)), self.num_mel_bins), np.float32)
            grown[:self._held] = self._buffer[:self._held]
            self._buffer = grown
        for row in range(self._held, ready):
            self._buffer[row] = self._fbank.get_frame(self._first + row)
        self._buffer[self._held:ready] -= self._mean
        self._buffer[self._held:ready] /= self._std
        self._held = ready

    def input_finished(self) -> None:
        """No more samples (snip_edges: produces no extra frames; further input is an error)."""
        if not self._finished:
            self._fbank.input_finished()
            self._finished = True
            self._fetch()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def num_samples(self) -> int:
        """Samples received so far."""
        return self._num_samples

    # ---- output --------------------------------------------------------------------------------

    @property
    def num_frames(self) -> int:
        """Total frames produced since the start of the stream (discarded ones included)."""
        return int(self._fbank.num_frames_ready)

    @property
    def first_frame(self) -> int:
        """Index of the oldest frame still held."""
        return self._first

    def frames(self, start: int, end: int) -> np.ndarray:
        """CMVN-normalised frames ``[start, end)`` as float32 [end - start, num_mel_bins] (a view of
        the stream's buffer: copy it to keep it past the next ``accept_waveform``/``discard``)."""
        if not self._first <= start <= end <= self.num_frames:
            raise ValueError(
                f"frames({start}, {end}): expected {self._first} <= start <= end <= {self.num_frames} "
                f"(frames before {self._first} were discarded)"
            )
        return self._buffer[start - self._first:end - self._first]

    def discard_before(self, frame: int) -> None:
        """Free every frame with index < ``frame`` (at most ``num_frames``; never un-discards)."""
        if frame > self.num_frames:
            raise ValueError(f"discard_before({frame}): only {self.num_frames} frames exist")
        if frame > self._first:
            drop = frame - self._first
            self._fbank.pop(drop)
            keep = self._held - drop
            self._buffer[:keep] = self._buffer[drop:self._held]  # a few hundred frames at most
            self._held, self._first = keep, frame


def as_feature_config(feature_cfg: FeatureConfig | Mapping[str, Any]) -> FeatureConfig:
    """The typed ``features`` section (a dict is checked: unknown or missing keys are refused)."""
    if isinstance(feature_cfg, FeatureConfig):
        return feature_cfg
    for key in ("sample_rate", "num_mel_bins", "frame_length_ms", "frame_shift_ms"):
        if key not in feature_cfg:
            raise ValueError(f"feature config needs {key!r}; got keys {sorted(feature_cfg)}")
    try:
        return FeatureConfig(**feature_cfg)
    except TypeError as exc:
        raise ValueError(f"feature config: {exc}") from None


def _check_cmvn(mean: np.ndarray | None, std: np.ndarray | None,
                dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (mean [dim], std [dim]) float32; None for both means identity."""
    if mean is None and std is None:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if mean is None or std is None:
        raise ValueError("give both cmvn_mean and cmvn_std, or neither")
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if mean.shape != (dim,) or std.shape != (dim,):
        raise ValueError(f"CMVN stats must be [{dim}], got mean {list(mean.shape)}, std {list(std.shape)}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ValueError("CMVN stats must be finite with std > 0")
    return mean, std
