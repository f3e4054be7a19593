"""``echostream translate``: the bad-input matrix, outputs (atomic, no clobbering), and end to end on
the tiny artifacts.

Input and output checks run before any model is loaded, so most tests need no artifacts; the CLI
logic (printing, JSON, metrics, timeline) is tested with a scripted translator; the end-to-end tests
run the real exported tiny model (random weights: its text is placeholder pieces).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from echostream.cli import main as cli_main
from echostream.runtime import translate_cli
from echostream.runtime.events import EndOfStream, SpeechChunk, TranslationText

RATE = 16000


def _speech_like(seconds: float = 1.5, rate: int = RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.8 * t)) / rate
    voiced = sum(np.sin(h * phase) / h for h in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None) ** 2
    return (0.25 * envelope * voiced + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


def _write(path: Path, data, rate=RATE, subtype=None) -> Path:
    soundfile.write(str(path), data, rate, subtype=subtype)
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main(["translate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_user_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("echostream translate: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# ---- bad input: one line, exit 2, before any model is loaded ----------------------------------


@pytest.fixture
def good_wav(tmp_path) -> Path:
    return _write(tmp_path / "in.wav", _speech_like(0.5))


NO_ARTIFACTS = "/nonexistent/artifacts"  # never reached: input checks come first


def test_missing_file(capsys, tmp_path):
    rc, _, err = _run(capsys, tmp_path / "nope.wav", "--artifacts", NO_ARTIFACTS)
    _assert_user_error(rc, err, "nope.wav", "no such file")


def test_directory(capsys, tmp_path):
    rc, _, err = _run(capsys, tmp_path, "--artifacts", NO_ARTIFACTS)
    _assert_user_error(rc, err, "is a directory")


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty file (0 bytes)"),
    (b"hello, this is text and not audio\n" * 10, "not a readable audio file"),
])
def test_not_audio_and_empty(capsys, tmp_path, content, fragment):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    rc, _, err = _run(capsys, path, "--artifacts", NO_ARTIFACTS)
    _assert_user_error(rc, err, fragment)


def test_zero_samples(capsys, tmp_path):
    rc, _, err = _run(capsys, _write(tmp_path / "z.wav", np.zeros(0, np.float32)),
                      "--artifacts", NO_ARTIFACTS)
    _assert_user_error(rc, err, "contains no samples")


def test_truncated_header(capsys, tmp_path, good_wav):
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good_wav.read_bytes()[:30])
    rc, _, err = _run(capsys, cut, "--artifacts", NO_ARTIFACTS)
    _assert_user_error(rc, err, "not a readable audio file")


@pytest.mark.parametrize("value, fragment", [(np.nan, "NaN/Inf"), (np.inf, "NaN/Inf"),
                                             (40.0, "|x| = 40")])
def test_bad_samples(capsys, tmp_path, value, fragment):
    x = _speech_like(3.0)
    x[int(2.5 * RATE)] = value  # late in the file: the up-front scan still finds it
    rc, _, err = _run(capsys, _write(tmp_path / "bad.wav", x, subtype="FLOAT"),
                      "--artifacts", NO_ARTIFACTS)
    _assert_user_error(rc, err, fragment, "2.500 s")


def test_existing_output_not_clobbered(capsys, tmp_path, good_wav):
    out, js = tmp_path / "out.wav", tmp_path / "out.json"
    out.write_bytes(b"precious")
    rc, _, err = _run(capsys, good_wav, "--artifacts", NO_ARTIFACTS, "--out", out)
    _assert_user_error(rc, err, "exists; pass --force")
    js.write_text("{}")
    rc, _, err = _run(capsys, good_wav, "--artifacts", NO_ARTIFACTS, "--json", js)
    _assert_user_error(rc, err, "exists; pass --force")
    assert out.read_bytes() == b"precious" and js.read_text() == "{}"


@pytest.mark.parametrize("extra, fragment", [
    (["--out", "{tmp}/x.mp4"], "expected a .wav/.flac/.ogg"),
    (["--out", "{tmp}/missing/x.wav"], "does not exist"),
    (["--out", "{tmp}/same.wav", "--json", "{tmp}/same.wav"], "same file"),
    (["--out", "{tmp}/in.wav", "--force"], "is the input file"),
    (["--json", "{tmp}"], "is a directory"),
    (["--threads", "2", "--backend", "tensorrt"], "--backend onnxruntime only"),
    (["--segment-ms", "0"], "positive"),
])
def test_bad_options(capsys, tmp_path, good_wav, extra, fragment):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    rc, _, err = _run(capsys, good_wav, "--artifacts", NO_ARTIFACTS, *extra)
    _assert_user_error(rc, err, fragment)


def test_missing_artifacts_is_one_line(capsys, good_wav):
    rc, _, err = _run(capsys, good_wav, "--artifacts", NO_ARTIFACTS)
    _assert_user_error(rc, err, NO_ARTIFACTS)


# ---- CLI logic with a scripted translator -------------------------------------------------------


class ScriptedTranslator:
    """Stands in for ``Translator``: per 320 ms of audio above a level, one token and 160 ms of
    speech; silence emits nothing (as a trained model would)."""

    class Stream:
        def __init__(self):
            self.samples, self.done, self.segments_done, self.ended = [], False, 0, False

        def accept_waveform(self, sample_rate, samples):
            assert sample_rate == RATE
            self.samples.append(np.asarray(samples))

        def input_finished(self):
            self.done = True

    class _Vocab:
        notice = None

    src_vocab = tgt_vocab = _Vocab()

    def create_stream(self):
        return self.Stream()

    def decode(self, stream):
        audio = np.concatenate(stream.samples) if stream.samples else np.zeros(0)
        events, seg = [], RATE * 320 // 1000
        while (stream.segments_done + 1) * seg <= len(audio):
            part = audio[stream.segments_done * seg:(stream.segments_done + 1) * seg]
            stream.segments_done += 1
            ms = 320.0 * stream.segments_done
            if np.abs(part).max() > 0.01:
                events.append(TranslationText(" w", (7,), ms))
                events.append(SpeechChunk(np.full(2560, 0.1, np.float32), RATE, ms, (1, 2)))
        if stream.done and not stream.ended:
            stream.ended = True
            n = sum(len(e.token_ids) for e in events if e.kind == "translation")
            events.append(EndOfStream(1000.0 * len(audio) / RATE, 0.0, "", "w" * n))
        return events


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(translate_cli, "_load_translator", lambda args: ScriptedTranslator())


def test_events_json_and_wav(capsys, tmp_path, scripted):
    inp = _write(tmp_path / "in.wav", _speech_like(1.5))
    out, js = tmp_path / "o.wav", tmp_path / "o.json"
    rc, stdout, err = _run(capsys, inp, "--artifacts", "x", "--out", out, "--json", js)
    assert rc == 0, err
    lines = [l for l in stdout.splitlines() if l.startswith("[")]
    assert lines and all("translation" in l or "speech" in l for l in lines)
    assert "[   0.320 s]" in stdout or "[   0.640 s]" in stdout
    report = json.loads(js.read_text())
    speech_events = [e for e in report["events"] if e["type"] == "speech"]
    wav, rate = soundfile.read(out, dtype="float32")
    assert rate == RATE and len(wav) == report["speech"]["num_samples"] == 2560 * len(speech_events)
    # metrics recomputed from the events
    delays = [e["source_ms"] for e in report["events"] if e["type"] == "translation"]
    from echostream.runtime.metrics import average_lagging
    assert report["metrics"]["text"]["AL"] == pytest.approx(average_lagging(delays, 1500.0))
    assert report["metrics"]["speech"]["segments"] == len(speech_events)
    assert report["input"]["sample_rate"] == RATE and report["metrics"]["source_ms"] == 1500.0
    assert "latency text" in stdout and "compute:" in stdout
    assert not list(tmp_path.glob(".*.part"))


def test_timeline_inserts_waiting_silence(capsys, tmp_path, scripted):
    x = _speech_like(2.0)
    x[int(0.64 * RATE):int(1.28 * RATE)] = 0.0  # two silent segments: output waits for the source
    inp = _write(tmp_path / "in.wav", x, subtype="FLOAT")
    plain, timed = tmp_path / "plain.wav", tmp_path / "timed.wav"
    assert _run(capsys, inp, "--artifacts", "x", "--out", plain)[0] == 0
    assert _run(capsys, inp, "--artifacts", "x", "--out", timed, "--timeline")[0] == 0
    a, b = soundfile.read(plain)[0], soundfile.read(timed)[0]
    assert len(b) > len(a) and np.count_nonzero(b) == np.count_nonzero(a)


def test_silence_runs_and_emits_nothing(capsys, tmp_path, scripted):
    inp = _write(tmp_path / "silence.wav", np.zeros(RATE, np.float32))
    out, js = tmp_path / "o.wav", tmp_path / "o.json"
    rc, stdout, err = _run(capsys, inp, "--artifacts", "x", "--out", out, "--json", js)
    assert rc == 0, err
    assert not [l for l in stdout.splitlines() if l.startswith("[")]
    assert "nothing emitted" in stdout
    report = json.loads(js.read_text())
    assert [e["type"] for e in report["events"]] == ["end"]
    assert report["metrics"]["text"]["AL"] is None and soundfile.info(out).frames == 0


def test_force_overwrites_and_failed_write_leaves_nothing(capsys, tmp_path, scripted, monkeypatch):
    inp = _write(tmp_path / "in.wav", _speech_like(1.0))
    out = tmp_path / "o.wav"
    out.write_bytes(b"old")
    assert _run(capsys, inp, "--artifacts", "x", "--out", out, "--force")[0] == 0
    assert soundfile.info(out).samplerate == RATE

    def broken(self, samples):
        Path(self.path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(translate_cli.SpeechFile, "_append",
                        lambda self, samples: self._checked(lambda: broken(self, samples)))
    fresh = tmp_path / "fresh.wav"
    rc, _, err = _run(capsys, inp, "--artifacts", "x", "--out", fresh)
    _assert_user_error(rc, err, "cannot write", "No space left on device")
    assert not fresh.exists() and not list(tmp_path.glob(".*.part"))


# ---- end to end on the exported tiny artifacts ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny_artifacts_dir) -> Path:
    """conftest's exported tiny artifacts (read-only; the CLI only reads them)."""
    return tiny_artifacts_dir


def _translate(capsys, tiny_dir, inp: Path, *extra) -> dict:
    js = inp.with_suffix(".json")
    rc, stdout, err = _run(capsys, inp, "--artifacts", tiny_dir, "--json", js, "--quiet", *extra)
    assert rc == 0, err
    assert "Traceback" not in err
    return json.loads(js.read_text())


def test_end_to_end_tiny(capsys, tmp_path, tiny_dir):
    inp = _write(tmp_path / "in.wav", _speech_like(1.5))
    out = tmp_path / "out.wav"
    rc, stdout, err = _run(capsys, inp, "--artifacts", tiny_dir, "--out", out,
                           "--json", tmp_path / "out.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "out.json").read_text())
    kinds = [e["type"] for e in report["events"]]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert len(soundfile.read(out)[0]) == report["speech"]["num_samples"]
    assert report["metrics"]["source_ms"] == pytest.approx(1500.0)
    end = report["events"][-1]
    assert report["translation_text"] == end["translation_text"]
    stamps = [e["source_ms"] for e in report["events"]]
    assert stamps == sorted(stamps)
    assert f"translation: {end['translation_text']}" in stdout


@pytest.mark.parametrize("variant", ["stereo", "6ch", "pcm24", "pcm_u8", "8k", "44k", "48k", "silence"])
def test_input_variants_run(capsys, tmp_path, tiny_dir, variant):
    """Every rate / channel layout / sample format of the matrix is accepted and translated."""
    from echostream.runtime.audio import StreamingResampler

    x = _speech_like(1.2)
    rate, subtype, data = RATE, None, x
    if variant == "stereo":
        data = np.stack([x, x], axis=1)
    elif variant == "6ch":
        data = np.stack([x] * 6, axis=1)
    elif variant == "pcm24":
        subtype = "PCM_24"
    elif variant == "pcm_u8":
        subtype = "PCM_U8"
    elif variant == "silence":
        data = np.zeros_like(x)
    else:
        rate = {"8k": 8000, "44k": 44100, "48k": 48000}[variant]
        data = StreamingResampler(RATE, rate).process(x, last=True)
    report = _translate(capsys, tiny_dir, _write(tmp_path / f"{variant}.wav", data, rate, subtype))
    assert report["input"]["sample_rate"] == rate
    assert report["input"]["channels"] == (data.shape[1] if data.ndim == 2 else 1)
    assert report["metrics"]["source_ms"] == pytest.approx(1200.0, abs=1.0)
    assert report["events"][-1]["type"] == "end"


def test_downmix_of_identical_channels_equals_mono(capsys, tmp_path, tiny_dir):
    x = _speech_like(1.2)
    mono = _translate(capsys, tiny_dir, _write(tmp_path / "mono.wav", x, subtype="FLOAT"))
    stereo = _translate(capsys, tiny_dir, _write(tmp_path / "st.wav", np.stack([x, x], 1), subtype="FLOAT"))
    assert mono["events"][-1]["translation_ids"] == stereo["events"][-1]["translation_ids"]
    assert mono["speech"]["num_samples"] == stereo["speech"]["num_samples"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None,
                    reason="espeak-ng not installed (apt-get install -y espeak-ng) for real speech")
def test_real_speech_espeak(capsys, tmp_path, tiny_dir):
    wav = tmp_path / "fr.wav"  # espeak writes 22.05 kHz 16-bit mono
    subprocess.run(["espeak-ng", "-v", "fr", "-w", str(wav), "Bonjour tout le monde."], check=True,
                   capture_output=True)
    report = _translate(capsys, tiny_dir, wav)
    assert report["input"]["sample_rate"] == soundfile.info(wav).samplerate
    assert report["events"][-1]["type"] == "end"


def test_sentences_with_pauses_get_their_own_metrics_and_speech_streams_to_disk(
        capsys, tmp_path, tiny_dir):
    """An endless-stream input (issue 14): every pause ends a sentence in the JSON, each with its
    own SimulEval metrics (delays from its start, compute from the previous sentence's end), and
    the speech file equals the chunks joined (written as they came, not kept in memory)."""
    pause = np.zeros(int(1.6 * RATE), np.float32)
    audio = np.concatenate([_speech_like(1.5, seed=1), pause, _speech_like(1.8, seed=2), pause,
                            _speech_like(1.2, seed=3)])
    inp, out, js = _write(tmp_path / "three.wav", audio), tmp_path / "three-out.wav", tmp_path / "3.json"
    rc, stdout, err = _run(capsys, inp, "--artifacts", tiny_dir, "--endpoint-silence-floor", "-15",
                           "--out", out, "--json", js)
    assert rc == 0, err
    report = json.loads(js.read_text())
    # Each sentence is printed as it ends; the summary counts them instead of repeating the texts.
    assert stdout.count("] sentence ") == 2
    assert f"sentences:   3 (2 pause, 1 end of input), texts in {js}" in stdout
    assert "translation: " not in stdout
    sentences = report["sentences"]
    assert [s["reason"] for s in sentences] == ["pause", "pause", "end_of_input"]
    bounds = [s["start_ms"] for s in sentences] + [report["metrics"]["source_ms"]]
    assert bounds == sorted(bounds) and bounds[0] == 0.0
    ends = [e for e in report["events"] if e["type"] == "end_of_sentence"]
    compute = [0.0] + [e["wall_ms"] for e in ends]
    for k, s in enumerate(sentences):
        text = s["metrics"]["text"]
        assert text["count"] > 0
        length = s["end_ms"] - s["start_ms"]
        assert 0.0 <= text["StartOffset"] <= length  # from the sentence's start, not the stream's
        own = compute[k + 1] - compute[k]  # this sentence's compute only
        assert 0.0 <= text["AL_CA"] - text["AL"] <= own + 1e-3
    samples, rate = soundfile.read(out, dtype="float32")
    assert rate == report["speech"]["sample_rate"] and len(samples) == report["speech"]["num_samples"]
    assert len(samples) == sum(e["num_samples"] for e in report["events"] if e["type"] == "speech")


def test_silence_floor_needs_endpointing(capsys, good_wav):
    rc, _, err = _run(capsys, good_wav, "--artifacts", "x", "--no-endpoint",
                      "--endpoint-silence-floor", "-15")
    _assert_user_error(rc, err, "--endpoint-silence-floor", "needs endpointing")
