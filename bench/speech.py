"""A real English speech input for the pipeline benchmark, synthesised with espeak-ng.

Real speech rather than noise because the pipeline's cost depends on what the policy does: how many
tokens the MT decoder writes, how many text states reach the unit decoder and vocoder. A passage of
plain prose read at 160 words per minute gives about 25 s of audio.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
