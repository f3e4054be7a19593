"""Audio input for the runtime: read, validate, downmix and resample to the model rate (no torch).

Everything a user can hand the translator goes through here, so every failure is an
:class:`~echostream.errors.AudioError` with a one-line message that names the file and says what was
expected and what was found.

Rules (the bad-input matrix):
- any container/codec libsndfile reads (WAV, FLAC, OGG/Vorbis, ...; 8/16/24/32-bit PCM, float);
- several channels are downmixed by their mean (what a listener would hear from a mono speaker);
- any sample rate: :class:`StreamingResampler` brings it to 16 kHz, chunk by chunk;
- refused: missing path, a directory, not audio / unsupported / truncated header, an empty file or
  zero samples, NaN/Inf samples, and float samples with ``|x| > MAX_FLOAT_PEAK`` (2.0). Float audio is
  meant to lie in [-1, 1]; mild overshoot (clipped masters, resampler ringing) is kept as is, but a
  peak above 2 almost always means integer PCM values stored as float (peaks ~32767) and would feed
  the fbank 30000x too loud, so it is refused rather than silently mangled;
- all-silence is valid input: it runs and emits nothing.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import soundfile
import soxr

from echostream.errors import AudioError

MODEL_SAMPLE_RATE = 16000
MAX_FLOAT_PEAK = 2.0


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says (after validation: frames > 0, sample_rate > 0)."""

    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str  # libsndfile major format, e.g. "WAV", "FLAC", "OGG"
    subtype: str  # e.g. "PCM_16", "PCM_24", "FLOAT", "VORBIS"

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def is_float(self) -> bool:
        """Float-coded files are the only ones that can hold NaN/Inf or values beyond [-1, 1]."""
        return self.subtype in ("FLOAT", "DOUBLE")

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "frames": self.frames,
            "duration_s": self.duration_s,
            "format": self.format,
            "subtype": self.subtype,
        }


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """Open ``path``'s header and validate it (no samples are read).

    Raises:
        AudioError: missing path, a directory, an empty file, not audio / unsupported format /
            truncated header, or a header that announces zero samples.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, expected an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes), expected audio")
    try:
        info = soundfile.info(path)
    except soundfile.SoundFileError as exc:
        raise AudioError(
            f"{path}: not a readable audio file ({_libsndfile_reason(exc)}); expected WAV, FLAC, "
            "OGG or another format libsndfile reads"
        ) from None
    if info.samplerate <= 0:
        raise AudioError(f"{path}: header gives sample rate {info.samplerate}, expected > 0")
    if info.frames <= 0:
        raise AudioError(f"{path}: contains no samples (header is valid, 0 frames)")
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames),
                     info.format, info.subtype)


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a whole file as mono float32.

    Returns:
        (samples [N] float32, nominally in [-1, 1], multi-channel downmixed by mean; sample_rate).
    Raises:
        AudioError: see :func:`probe_audio` and :func:`check_samples`.
    """
    info = probe_audio(path)
    try:
        data, _ = soundfile.read(info.path, dtype="float32", always_2d=True)
    except soundfile.SoundFileError as exc:
        raise AudioError(f"{info.path}: cannot read samples ({_libsndfile_reason(exc)})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{info.path}: contains no samples (0 frames could be read)")
    samples = downmix(data)
    check_samples(samples, info.sample_rate, where=info.path)
    return samples, info.sample_rate


def iter_audio_blocks(path: str | os.PathLike, block_seconds: float = 1.0) -> Iterator[np.ndarray]:
    """Stream a file in blocks of ``block_seconds`` (memory stays bounded for hour-long files).

    Yields:
        mono float32 blocks [n] at the file's own rate (see :func:`probe_audio`); the last one may
        be shorter. Each block is validated (NaN/Inf, float range) with its position in the file.
    """
    if not (block_seconds > 0 and math.isfinite(block_seconds)):
        raise ValueError(f"block_seconds must be a positive number, got {block_seconds!r}")
    info = probe_audio(path)
    blocksize = max(1, int(round(block_seconds * info.sample_rate)))
    offset = 0
    try:
        for block in _blocks(info.path, blocksize):
            samples = downmix(block)
            check_samples(samples, info.sample_rate, where=info.path, offset=offset)
            offset += samples.shape[0]
            yield samples
    except soundfile.SoundFileError as exc:
        raise AudioError(
            f"{info.path}: read failed after {offset / info.sample_rate:.3f} s "
            f"({_libsndfile_reason(exc)})"
        ) from None
    if offset == 0:
        raise AudioError(f"{info.path}: contains no samples (0 frames could be read)")


def _blocks(path: str, blocksize: int) -> Iterator[np.ndarray]:
    """Blocks of what the decoder really returns. (``soundfile.blocks`` trusts the header's frame
    count; for MP3 that is an estimate, and the frames past the real end come back as whatever
    the buffer held.)"""
    with soundfile.SoundFile(path) as f:
        while True:
            block = f.read(blocksize, dtype="float32", always_2d=True)
            if not len(block):
                return
            yield block


def scan_audio(path: str | os.PathLike, block_seconds: float = 10.0) -> AudioInfo:
    """Validate a whole file up front (header and every sample) without keeping it in memory.

    Used by the CLI so that a NaN an hour into a file fails before models are loaded.
    Returns:
        the file's :class:`AudioInfo`.
    """
    info = probe_audio(path)
    for _ in iter_audio_blocks(info.path, block_seconds):
        pass
    return info


def downmix(data: np.ndarray) -> np.ndarray:
    """[N, C] (or [N]) samples -> [N] float32 mono by channel mean."""
    if data.ndim == 1:
        return np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"expected samples [N] or [N, channels], got shape {data.shape}")
    if data.shape[1] == 1:
        return np.ascontiguousarray(data[:, 0], dtype=np.float32)
    return data.mean(axis=1, dtype=np.float64).astype(np.float32)


def check_samples(samples: np.ndarray, sample_rate: int, *, where: str = "audio",
                  offset: int = 0) -> None:
    """Refuse NaN/Inf and float samples beyond ``MAX_FLOAT_PEAK``.

    Args:
        samples: [N] float samples.
        sample_rate: to report positions in seconds.
        where: what to name in the message (a path, or "audio").
        offset: index of ``samples[0]`` in the whole stream (for the reported position).
    Raises:
        AudioError: one line with the count, the first position and what was expected.
    """
    finite = np.isfinite(samples)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        first = (offset + int(bad[0])) / sample_rate
        raise AudioError(
            f"{where}: {bad.size} NaN/Inf sample(s), first at {first:.3f} s; expected finite audio"
        )
    if samples.size == 0:
        return
    peak_index = int(np.argmax(np.abs(samples)))
    peak = float(abs(samples[peak_index]))
    if peak > MAX_FLOAT_PEAK:
        at = (offset + peak_index) / sample_rate
        raise AudioError(
            f"{where}: float samples reach |x| = {peak:.6g} at {at:.3f} s; expected [-1, 1] "
            f"(refused above {MAX_FLOAT_PEAK:g}; integer PCM stored as float? divide by 32768)"
        )


class StreamingResampler:
    """Chunk-size-invariant resampling of a mono stream (soxr's streaming resampler).

    Feeding a signal in any split gives the same output as one call, so the runtime can resample
    live audio block by block. ``in_rate == out_rate`` passes samples through unchanged.

    Example::

        rs = StreamingResampler(44100)            # -> 16 kHz
        for block in blocks: out = rs.process(block)
        tail = rs.flush()
    """

    def __init__(self, in_rate: int, out_rate: int = MODEL_SAMPLE_RATE, quality: str = "HQ"):
        for name, rate in (("in_rate", in_rate), ("out_rate", out_rate)):
            if not isinstance(rate, (int, np.integer)) or rate <= 0:
                raise ValueError(f"{name} must be a positive integer sample rate, got {rate!r}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._finished = False
        self._stream = None
        if self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32",
                                               quality=quality)

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def process(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample the next chunk.

        Args:
            samples: [n] float samples at ``in_rate`` (n may be 0).
            last: True for the final chunk (flushes the filter's delay line).
        Returns:
            [m] float32 samples at ``out_rate`` (m is not tied to n chunk by chunk; totals match).
        """
        if self._finished:
            raise ValueError("StreamingResampler.process called after the last chunk")
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples [n], got shape {samples.shape}")
        self._finished = last
        if self._stream is None:
            return samples.copy()
        return self._stream.resample_chunk(np.ascontiguousarray(samples), last=last)

    def flush(self) -> np.ndarray:
        """End of stream: the filter's remaining output [m] float32."""
        return self.process(np.zeros(0, dtype=np.float32), last=True)


def _libsndfile_reason(exc: Exception) -> str:
    """libsndfile's own reason without the "Error opening 'path': " prefix soundfile adds."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("Error opening") and ": " in text:
        text = text.split(": ", 1)[1]
    return text.rstrip(".")
