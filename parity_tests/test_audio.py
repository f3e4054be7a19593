"""Runtime audio input: formats, downmix, block streaming, resampling, and the bad-input matrix."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile

from echostream.errors import AudioError
from echostream.runtime.audio import (
    MAX_FLOAT_PEAK,
    StreamingResampler,
    downmix,
    iter_audio_blocks,
    probe_audio,
    read_audio,
    scan_audio,
)

RATE = 16000


def _tone(seconds: float = 0.5, rate: int = RATE, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write(path, data, rate=RATE, subtype=None, format=None):
    soundfile.write(str(path), data, rate, subtype=subtype, format=format)
    return path


# ---- formats and channels ---------------------------------------------------------------------


@pytest.mark.parametrize("subtype, tol", [
    ("PCM_16", 1 / 32768), ("PCM_24", 1 / 2**23), ("PCM_32", 1 / 2**31),
    ("PCM_U8", 1 / 128), ("FLOAT", 0.0),
])
def test_wav_subtypes_read_as_float_mono(tmp_path, subtype, tol):
    x = _tone()
    path = _write(tmp_path / f"{subtype}.wav", x, subtype=subtype)
    samples, rate = read_audio(path)
    assert rate == RATE and samples.dtype == np.float32 and samples.shape == x.shape
    assert np.abs(samples - x).max() <= tol + 1e-7


def test_flac_lossless_and_ogg_lossy(tmp_path):
    x = _tone()
    flac, _ = read_audio(_write(tmp_path / "a.flac", x, subtype="PCM_16"))
    assert np.abs(flac - x).max() <= 1 / 32768 + 1e-7
    ogg, rate = read_audio(_write(tmp_path / "a.ogg", x))
    assert rate == RATE and abs(len(ogg) - len(x)) <= 1
    n = min(len(ogg), len(x))
    assert np.corrcoef(ogg[:n], x[:n])[0, 1] > 0.99


@pytest.mark.parametrize("channels", [2, 6])
def test_multichannel_is_downmixed_by_mean(tmp_path, channels):
    rng = np.random.default_rng(channels)
    data = (0.2 * rng.standard_normal((4000, channels))).astype(np.float32)
    samples, _ = read_audio(_write(tmp_path / "multi.wav", data, subtype="FLOAT"))
    np.testing.assert_allclose(samples, data.mean(axis=1), atol=1e-7)
    assert probe_audio(tmp_path / "multi.wav").channels == channels


def test_downmix_shapes():
    assert downmix(np.ones(5, np.float64)).dtype == np.float32
    np.testing.assert_array_equal(downmix(np.array([[1.0, 3.0], [0.0, -2.0]])), [2.0, -1.0])
    with pytest.raises(ValueError, match=r"\[N\] or \[N, channels\]"):
        downmix(np.zeros((2, 2, 2)))


def test_blocks_equal_whole_file(tmp_path):
    x = np.concatenate([_tone(1.03), _tone(0.5, freq=300)])
    path = _write(tmp_path / "a.wav", x, subtype="FLOAT")
    blocks = list(iter_audio_blocks(path, block_seconds=0.25))
    assert [len(b) for b in blocks[:-1]] == [4000] * (len(blocks) - 1)
    np.testing.assert_array_equal(np.concatenate(blocks), read_audio(path)[0])
    with pytest.raises(ValueError, match="block_seconds"):
        next(iter_audio_blocks(path, block_seconds=0))


def test_all_silence_is_valid(tmp_path):
    samples, _ = read_audio(_write(tmp_path / "s.wav", np.zeros(8000, np.float32)))
    assert samples.shape == (8000,) and not samples.any()


def test_float_overshoot_below_bound_is_kept(tmp_path):
    x = _tone(amp=1.5)  # clipped-master style overshoot: kept, not rescaled
    samples, _ = read_audio(_write(tmp_path / "hot.wav", x, subtype="FLOAT"))
    assert np.isclose(np.abs(samples).max(), 1.5, atol=1e-3)


# ---- bad input: one-line AudioError naming the file --------------------------------------------


def _assert_one_line(exc: pytest.ExceptionInfo, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="no such file") as exc:
        read_audio(tmp_path / "nope.wav")
    _assert_one_line(exc, tmp_path / "nope.wav")


def test_directory(tmp_path):
    with pytest.raises(AudioError, match="is a directory") as exc:
        read_audio(tmp_path)
    _assert_one_line(exc, tmp_path)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file") as exc:
        read_audio(path)
    _assert_one_line(exc, path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty file \(0 bytes\)"):
        read_audio(path)


def test_zero_samples(tmp_path):
    path = _write(tmp_path / "zero.wav", np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="contains no samples"):
        read_audio(path)
    with pytest.raises(AudioError, match="contains no samples"):
        list(iter_audio_blocks(path))


@pytest.mark.parametrize("keep", [12, 30])
def test_truncated_header(tmp_path, keep):
    full = _write(tmp_path / "full.wav", _tone(), subtype="PCM_16").read_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(full[:keep])
    with pytest.raises(AudioError, match="not a readable audio file") as exc:
        read_audio(path)
    _assert_one_line(exc, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_refused_with_position(tmp_path, bad):
    x = _tone(2.0)
    x[int(1.5 * RATE)] = bad
    path = _write(tmp_path / "bad.wav", x, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"1 NaN/Inf sample\(s\), first at 1\.500 s"):
        read_audio(path)
    # streaming finds it in a later block, with the same absolute position
    with pytest.raises(AudioError, match=r"first at 1\.500 s"):
        list(iter_audio_blocks(path, block_seconds=0.5))
    with pytest.raises(AudioError, match="NaN/Inf"):
        scan_audio(path)


def test_float_far_outside_range_refused(tmp_path):
    x = _tone(amp=1.0) * 32767  # int16 values stored as float: the classic mistake
    path = _write(tmp_path / "loud.wav", x, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"\|x\| = 3276\d.*refused above {MAX_FLOAT_PEAK:g}") as exc:
        read_audio(path)
    assert "divide by 32768" in _assert_one_line(exc, path)


# ---- resampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("in_rate", [8000, 44100, 48000])
def test_resampler_chunk_size_invariant(in_rate):
    rng = np.random.default_rng(in_rate)
    x = (0.1 * rng.standard_normal(int(1.3 * in_rate))).astype(np.float32)
    whole = StreamingResampler(in_rate).process(x, last=True)
    rs, pieces, i = StreamingResampler(in_rate), [], 0
    while i < len(x):
        n = int(rng.integers(0, 3000))
        pieces.append(rs.process(x[i:i + n]))
        i += n
    pieces.append(rs.flush())
    streamed = np.concatenate(pieces)
    np.testing.assert_array_equal(streamed, whole)
    assert abs(len(whole) - round(len(x) * RATE / in_rate)) <= 1


@pytest.mark.parametrize("in_rate", [8000, 44100, 48000])
def test_resampler_keeps_frequency(in_rate):
    out = StreamingResampler(in_rate).process(_tone(1.0, rate=in_rate, freq=1000.0), last=True)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * RATE / len(out)
    assert abs(peak_hz - 1000.0) < 2.0


def test_resampler_passthrough_and_errors():
    rs = StreamingResampler(RATE)
    x = _tone(0.1)
    assert rs.passthrough
    np.testing.assert_array_equal(rs.process(x), x)
    assert rs.flush().size == 0
    with pytest.raises(ValueError, match="after the last chunk"):
        rs.process(x)
    with pytest.raises(ValueError, match="in_rate must be a positive integer"):
        StreamingResampler(0)
    with pytest.raises(ValueError, match=r"mono samples \[n\]"):
        StreamingResampler(8000).process(np.zeros((2, 3), np.float32))


def test_mp3_blocks_stop_where_the_decoder_stops():
    """An MP3 header's frame count is an estimate (208782 for 208512 real frames here): the
    blocks must hold exactly what the decoder returns, not stale buffer contents past the end."""
    from pathlib import Path

    clip = Path(__file__).resolve().parents[2] / "shared/streamspeech/example/wavs/common_voice_fr_17301936.mp3"
    if not clip.is_file():
        pytest.skip(f"{clip} absent")
    whole, _ = soundfile.read(str(clip), dtype="float32")
    for block_seconds in (0.32, 1.0):
        blocks = np.concatenate(list(iter_audio_blocks(clip, block_seconds)))
        assert len(blocks) == len(whole)
        np.testing.assert_allclose(blocks, whole, atol=1e-6, rtol=0)  # 1 ulp: block decoding
