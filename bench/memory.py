"""Peak resident memory of a whole ``translate`` run, measured in a fresh child process.

A child, because the benchmark process itself holds PyTorch models, other sessions and
measurement buffers: only a clean process shows what the runtime needs. The child imports the
runtime (no torch), runs the file through the translator on ONNX Runtime exactly as
``echostream translate`` does, and reports the kernel's RSS high-water mark, so short peaks (e.g.
during session creation) are not missed the way sampling would miss them. On Linux that is
``VmHWM`` of ``/proc/self/status``, not ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss``
across fork + exec, so a child of a big parent (this benchmark holds PyTorch models) would report
the parent's size. The same child also reports its RSS right after ``import`` (the interpreter +
numpy + onnxruntime floor that any runtime pays, weights or not).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

_CHILD = r"""
import json, resource, sys
import psutil
from echostream.runtime.audio import scan_audio
from echostream.runtime.translate_cli import translate_file
from echostream.runtime.translator import Translator
import onnxruntime  # noqa: F401  (the floor includes the backend's libraries)
floor = psutil.Process().memory_info().rss
artifacts, audio, threads, segment_ms = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
translator = Translator.from_artifacts(artifacts, backend="onnxruntime", segment_ms=segment_ms,
                                       threads=threads)
loaded = psutil.Process().memory_info().rss
run = translate_file(translator, scan_audio(audio), segment_ms)
def high_water():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"
peak, source = high_water()
print(json.dumps({"peak_rss_bytes": peak, "peak_source": source, "import_rss_bytes": floor,
                  "loaded_rss_bytes": loaded, "torch_imported": "torch" in sys.modules,
                  "events": len(run.events)}))
"""


def translate_peak_rss(artifacts: str | Path, audio: str | Path, threads: int,
                       segment_ms: int = 320, timeout_s: float = 900) -> dict[str, Any]:
    """Run one ``translate`` of ``audio`` in a child process; return its memory high-water marks.

    Returns:
        ``{"peak_rss_bytes", "peak_source", "import_rss_bytes", "loaded_rss_bytes",
        "torch_imported", "events"}``.
    Raises:
        RuntimeError with the child's last stderr lines if it fails.
    """
    out = subprocess.run([sys.executable, "-c", _CHILD, str(artifacts), str(audio), str(threads),
                          str(segment_ms)], capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"translate child process failed (exit {out.returncode}):\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])
