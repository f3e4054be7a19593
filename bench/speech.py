"""A real English speech input for the pipeline benchmark, synthesised with espeak-ng.

Real speech rather than noise because the pipeline's cost depends on what the policy does: how many
tokens the MT decoder writes, how many text states reach the unit decoder and vocoder. A passage of
plain prose read at 160 words per minute gives about 25 s of audio.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

PASSAGE = (
    "The history of simultaneous interpretation begins in the nineteen twenties, when the "
    "League of Nations first tried to let delegates hear speeches in their own language while the "
    "speaker was still talking. Today the same idea drives streaming speech "
    "translation: a model reads the incoming audio in short segments, decides after each one "
    "whether it has heard enough to commit to more words, and speaks the translation before the "
    "sentence is finished."
)


def synthesize_speech(path: str | Path, text: str = PASSAGE, voice: str = "en-us",
                      words_per_minute: int = 160) -> dict:
    """Write ``text`` read by espeak-ng to ``path`` (WAV, espeak-ng's native 22.05 kHz mono).

    Returns:
        ``{"path", "seconds", "sample_rate", "text", "voice"}``.
    Raises:
        RuntimeError: espeak-ng is not installed (``apt-get install -y espeak-ng``) or failed.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng), or pass "
                           "--audio FILE with ~20-30 s of speech")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", str(path), text],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or not path.is_file():
        raise RuntimeError(f"espeak-ng failed (exit {out.returncode}): {out.stderr.strip()[:200]}")
    info = sf.info(str(path))
    return {"path": str(path), "seconds": info.frames / info.samplerate,
            "sample_rate": info.samplerate, "text": text, "voice": voice}


def synthetic_voice(path: str | Path, seconds: float = 26.0, sample_rate: int = 16000) -> dict:
    """A speech-like stand-in when espeak-ng is missing (quick mode only): harmonics of a gliding
    100-200 Hz pitch, gated into 4 Hz "syllables" with short pauses. Not speech -- the report
    says so -- but it drives every stage of the pipeline.

    Returns:
        ``{"path", "seconds", "sample_rate", "source": "synthetic"}``.
    """
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 150 + 50 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.25 * t) > -0.7)
    rng = np.random.default_rng(0)
    samples = 0.2 * voiced * syllables + 0.003 * rng.standard_normal(t.size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.9 * samples / np.abs(samples).max()).astype(np.float32), sample_rate)
    return {"path": str(path), "seconds": seconds, "sample_rate": sample_rate, "source": "synthetic"}
