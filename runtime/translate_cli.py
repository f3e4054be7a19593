"""``echostream translate``: stream an audio file through exported artifacts, like a live microphone.

The file is read in blocks of one policy segment (as SimulEval feeds a simultaneous agent), each
block goes into the stream and is decoded at once, and every event is printed as it arrives with
the source time it needed::

    [  0.680 s] asr          bonjour
    [  1.000 s] translation  hello
    [  1.000 s] speech       0.320 s (5120 samples, 11 units)

At the end the full texts and the latency metrics (SimulEval definitions, ``runtime/metrics.py``)
are printed; ``--out`` gets the translated speech (16 kHz) and ``--json`` every event and metric.

With ``--server HOST:PORT`` the file goes to a Triton server instead (``echostream serve``): one
sequence over gRPC, in chunks of the served segment, each answered with that chunk's events, which
are printed the same way (they equal the in-process ones); ``--realtime`` sends the chunks at the
pace of the audio without waiting for the answers, as a live microphone would.

Outputs are written atomically (a temp file in the same folder, then ``os.replace``): a failure or an
interrupt never leaves a partial file, and an existing file is only replaced with ``--force``.
Everything is checked before models are loaded (input audio, every sample of it, output paths).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from echostream.atomic import atomic_file
from echostream.runtime.artifacts import PRECISIONS
from echostream.runtime.backends import BACKENDS
from echostream.errors import EchoStreamError

AUDIO_OUT_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN",
                        help="audio file (WAV, FLAC, OGG, ...; any rate, any channels)")
    parser.add_argument("--artifacts", metavar="DIR",
                        help="artifacts folder written by `echostream export` (or use --server)")
    parser.add_argument("--server", metavar="HOST:PORT",
                        help="translate on a Triton server (`echostream serve`; its gRPC endpoint; "
                             "several replicas: HOST:PORT,HOST:PORT, the sequence routed by its id)")
    parser.add_argument("--realtime", action="store_true",
                        help="with --server: send the chunks at the pace of the audio, without waiting "
                             "for each answer")
    parser.add_argument("--backend", choices=list(BACKENDS), default="onnxruntime")
    parser.add_argument("--segment-ms", type=int, default=None, metavar="MS",
                        help="policy segment: a multiple of the Emformer segment, or exactly the chunk "
                             "Conformer's chunk x 40 ms (default 320; with --server: the chunk size "
                             "sent, default the served segment)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads (onnxruntime backend)")
    parser.add_argument("--out", metavar="OUT.wav",
                        help="write the translated speech (.wav/.flac/.ogg, 16 kHz)")
    parser.add_argument("--json", metavar="OUT.json", help="write every event, the texts and the metrics")
    parser.add_argument("--timeline", action="store_true",
                        help="in --out, insert the silences a real-time listener would hear "
                             "(SimulEval's output timeline) instead of joining the chunks")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every artifact file (by default a file unchanged since its "
                             "sha256 last matched is not re-read)")


def main(args: argparse.Namespace) -> int:
    from echostream.runtime.audio import scan_audio

    outputs = _check_outputs(args)
    if (args.artifacts is None) == (args.server is None):
        raise EchoStreamError("give exactly one of --artifacts DIR (in-process) and --server HOST:PORT "
                              "(a Triton server)")
    if args.realtime and args.server is None:
        raise EchoStreamError("--realtime applies to --server only")
    if args.segment_ms is not None and args.segment_ms <= 0:
        raise EchoStreamError(f"--segment-ms expected a positive number of ms, got {args.segment_ms}")
    if args.threads is not None and (args.threads < 1 or args.backend != "onnxruntime"
                                     or args.server is not None):
        raise EchoStreamError("--threads expects N >= 1 and applies to --backend onnxruntime only "
                              "(in-process)")
    info = scan_audio(args.input)  # every sample, before any model is loaded
    on_event = None if args.quiet else _print_event
    if args.server is not None:
        from echostream.runtime.triton_client import TritonTranslator, translate_remote

        client = TritonTranslator([u.strip() for u in args.server.split(",") if u.strip()])
        args.segment_ms = args.segment_ms or client.segment_ms
        run = translate_remote(client, info, args.segment_ms, args.realtime, on_event=on_event)
        args.backend, args.precision = f"triton {args.server}", "(server's)"
    else:
        args.segment_ms = args.segment_ms or 320
        translator = _load_translator(args)
        for vocab in (translator.src_vocab, translator.tgt_vocab):
            if vocab.notice:
                print(vocab.notice, file=sys.stderr)
                break
        run = translate_file(translator, info, args.segment_ms, on_event=on_event)
    report = run.report(info, args)
    _print_summary(run, report, args)
    if "out" in outputs:
        samples = run.timeline_samples() if args.timeline else run.samples()
        fmt = AUDIO_OUT_FORMATS[outputs["out"].suffix.lower()]
        _write_atomic(outputs["out"], args.force,
                      lambda p: _write_audio(p, samples, run.sample_rate, *fmt))
    if "json" in outputs:
        text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        _write_atomic(outputs["json"], args.force, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return 0


# ---- running ------------------------------------------------------------------------------------


@dataclass
class TranslationRun:
    """Every event of one file, with the wall-clock compute time when each one was returned.

    ``wall_ms[i]``: milliseconds spent inside ``accept_waveform`` + ``decode`` (file reading
    excluded) up to the end of the call that returned ``events[i]`` -- SimulEval's "elapsed" minus
    the source delay, for computation-aware latency.
    """

    events: list = field(default_factory=list)
    wall_ms: list = field(default_factory=list)
    source_ms: float = 0.0
    sample_rate: int = 16000
    stage_clock: dict = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[tuple[Any, float]]:
        return [(e, w) for e, w in zip(self.events, self.wall_ms) if e.kind == kind]

    @property
    def end(self):
        ends = self.of_kind("end")
        return ends[-1][0] if ends else None

    def samples(self) -> np.ndarray:
        """All translated speech [n] float32, chunks joined."""
        chunks = [e.samples for e, _ in self.of_kind("speech")]
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)

    def speech_segments(self) -> list[tuple[tuple[float, float], float]]:
        """((delay_ms, duration_ms), wall_ms) of every chunk that carries samples."""
        return [((e.source_ms, e.duration_ms), w) for e, w in self.of_kind("speech") if len(e.samples)]

    def timeline_samples(self) -> np.ndarray:
        """Speech on SimulEval's listening timeline: silence wherever output waited for the source."""
        from echostream.runtime.metrics import speech_intervals

        chunks = [e for e, _ in self.of_kind("speech") if len(e.samples)]
        if not chunks:
            return np.zeros(0, np.float32)
        intervals = speech_intervals([(e.source_ms, e.duration_ms) for e in chunks])
        origin, pieces, written = intervals[0][0], [], 0
        for chunk, (start, _) in zip(chunks, intervals):
            gap = int(round((start - origin) * self.sample_rate / 1000.0)) - written
            if gap > 0:
                pieces.append(np.zeros(gap, np.float32))
                written += gap
            pieces.append(chunk.samples.astype(np.float32))
            written += len(chunk.samples)
        return np.concatenate(pieces)

    def report(self, info, args: argparse.Namespace) -> dict[str, Any]:
        """The JSON document: input, settings, events, texts, metrics, compute."""
        from echostream.runtime.metrics import speech_latency, text_latency

        text_delays, text_wall = [], []
        for event, wall in self.of_kind("translation"):
            text_delays += [event.source_ms] * len(event.token_ids)
            text_wall += [wall] * len(event.token_ids)
        segments = self.speech_segments()
        end = self.end
        wall_s = (self.wall_ms[-1] if self.wall_ms else 0.0) / 1000.0
        events = [dict(e.to_json(), wall_ms=round(w, 3)) for e, w in zip(self.events, self.wall_ms)]
        return {
            "input": info.to_dict(),
            "artifacts": None if args.artifacts is None else str(args.artifacts),
            "server": getattr(args, "server", None), "backend": args.backend,
            "precision": args.precision, "segment_ms": args.segment_ms,
            "asr_text": end.asr_text if end else "",
            "translation_text": end.translation_text if end else "",
            "speech": {"file": args.out, "sample_rate": self.sample_rate,
                       "num_samples": int(sum(len(e.samples) for e, _ in self.of_kind("speech"))),
                       "timeline": bool(args.timeline)},
            "metrics": {
                "source_ms": self.source_ms,
                "definitions": "SimulEval: delays in ms of source consumed at emission; _CA adds "
                               "wall-clock compute up to the emission (wall_ms)",
                "text": dict(text_latency(text_delays, self.source_ms, text_wall), unit="token"),
                "speech": speech_latency([s for s, _ in segments], self.source_ms,
                                         [w for _, w in segments]),
            },
            "compute": {"wall_s": wall_s, "rtf": wall_s / (self.source_ms / 1000.0),
                        "stages": self.stage_clock},
            "events": events,
        }


def translate_file(translator, info, segment_ms: int,
                   on_event: Callable[[Any], None] | None = None) -> TranslationRun:
    """Feed ``info.path`` block by block (one policy segment each) and collect every event.

    Args:
        translator: a ``Translator``.
        info: the file's ``AudioInfo`` (already validated).
        segment_ms: block length; one block per policy segment, as SimulEval feeds an agent.
        on_event: called with each event as soon as it is returned.
    """
    from echostream.runtime.audio import iter_audio_blocks

    run = TranslationRun()
    stream = translator.create_stream()
    spent = 0.0

    def timed(call: Callable[[], list]) -> None:
        nonlocal spent
        start = time.perf_counter()
        events = call() or []
        spent += time.perf_counter() - start
        for event in events:
            run.events.append(event)
            run.wall_ms.append(1000.0 * spent)
            if on_event is not None:
                on_event(event)

    def feed(block: np.ndarray) -> list:
        stream.accept_waveform(info.sample_rate, block)
        return translator.decode(stream)

    def finish() -> list:
        stream.input_finished()
        return translator.decode(stream)

    for block in iter_audio_blocks(info.path, segment_ms / 1000.0):
        timed(lambda b=block: feed(b))
    timed(finish)
    run.source_ms = 1000.0 * info.frames / info.sample_rate
    run.sample_rate = next((e.sample_rate for e in run.events if e.kind == "speech"), 16000)
    run.stage_clock = stream.clock.to_dict() if hasattr(stream, "clock") else {}
    return run


def _load_translator(args: argparse.Namespace):
    from echostream.runtime.translator import Translator

    options = {} if args.threads is None else {"threads": args.threads}
    return Translator.from_artifacts(args.artifacts, backend=args.backend, segment_ms=args.segment_ms,
                                     precision=args.precision, rehash=args.verify, **options)


# ---- printing -----------------------------------------------------------------------------------


def _print_event(event) -> None:
    stamp = f"[{event.source_ms / 1000.0:8.3f} s]"
    if event.kind in ("asr", "translation"):
        print(f"{stamp} {event.kind:<12} {event.text}", flush=True)
    elif event.kind == "speech":
        print(f"{stamp} {'speech':<12} {event.duration_ms / 1000.0:.3f} s ({len(event.samples)} samples, "
              f"{len(event.unit_ids)} units)", flush=True)
    elif event.kind == "end_of_sentence" and event.capacity:
        print(f"{stamp} {'sentence':<12} ended at the {event.reason.replace('_', ' ')} "
              f"(a longer sentence does not fit the exported windows)", flush=True)


def _print_summary(run: TranslationRun, report: dict[str, Any], args: argparse.Namespace) -> None:
    m = report["metrics"]
    speech = report["speech"]
    print(f"asr:         {report['asr_text']}")
    print(f"translation: {report['translation_text']}")
    print(f"speech:      {speech['num_samples'] / run.sample_rate:.3f} s"
          + (f" -> {args.out}" if args.out else ""))
    for kind in ("text", "speech"):
        r = m[kind]
        if r["AL"] is None:
            print(f"latency {kind:<6} nothing emitted")
            continue
        print(f"latency {kind:<6} AL {r['AL']:.1f} ms (CA {r['AL_CA']:.1f}), StartOffset "
              f"{r['StartOffset']:.1f} ms, EndOffset {r['EndOffset']:.1f} ms")
    c = report["compute"]
    print(f"compute:     {c['wall_s']:.3f} s for {m['source_ms'] / 1000.0:.3f} s of audio "
          f"(RTF {c['rtf']:.3f}, {args.backend} {args.precision})")


# ---- outputs ------------------------------------------------------------------------------------


def _check_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """Validate ``--out`` / ``--json`` before any work; returns the ones given."""
    outputs = {k: Path(v) for k, v in (("out", args.out), ("json", args.json)) if v}
    if "out" in outputs and outputs["out"].suffix.lower() not in AUDIO_OUT_FORMATS:
        raise EchoStreamError(f"--out {outputs['out']}: expected a {'/'.join(AUDIO_OUT_FORMATS)} "
                              f"file name, got suffix {outputs['out'].suffix or '(none)'!r}")
    resolved = {k: p.resolve() for k, p in outputs.items()}
    if len(set(resolved.values())) < len(resolved):
        raise EchoStreamError("--out and --json name the same file")
    source = Path(args.input).resolve()
    for key, path in outputs.items():
        if resolved[key] == source:
            raise EchoStreamError(f"--{key} {path} is the input file; refusing to overwrite it")
        if path.is_dir():
            raise EchoStreamError(f"--{key} {path} is a directory, expected a file name")
        if not path.parent.is_dir():
            raise EchoStreamError(f"--{key} {path}: folder {path.parent} does not exist")
        if path.exists() and not args.force:
            raise EchoStreamError(f"--{key} {path} exists; pass --force to overwrite it")
    return outputs


def _write_atomic(path: Path, force: bool, write: Callable[[str], None]) -> None:
    """Write via a temp file in the same folder, then rename over ``path`` (never partial)."""
    if path.exists() and not force:  # appeared while we were translating
        raise EchoStreamError(f"{path} exists; pass --force to overwrite it")
    try:
        with atomic_file(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise EchoStreamError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_audio(path: str, samples: np.ndarray, sample_rate: int, fmt: str, subtype: str) -> None:
    import soundfile

    soundfile.write(path, np.clip(samples, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
