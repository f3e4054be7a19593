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
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from echostream.atomic import atomic_file
from echostream.runtime.artifacts import PRECISIONS
from echostream.runtime.backends import BACKENDS
from echostream.runtime.endpoint import EndpointConfig
from echostream.runtime.translator import FIDELITIES
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
    add_model_options(parser)
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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The sentence options of the model (endpointing, fidelity); `echostream triton-repo` bakes
    the same ones into a served model."""
    parser.add_argument("--endpoint", action=argparse.BooleanOptionalAction, default=None,
                        help="end sentences at pauses (the ASR head's blanks; default: on, off "
                             "with --fidelity exact)")
    parser.add_argument("--endpoint-after-text-ms", type=float, default=None, metavar="MS",
                        help="a pause after text this long ends the sentence (default 1000)")
    parser.add_argument("--endpoint-no-text-ms", type=float, default=None, metavar="MS",
                        help="silence without text this long restarts the sentence (default 3000)")
    parser.add_argument("--endpoint-silence-floor", type=float, default=None, metavar="LOGMEL",
                        help="energy gate: encoder frames whose every mel bin lies below this raw "
                             "log-mel read as blank (digital silence is -15.9, speech > 0; the "
                             "seeded random-weight presets need -15 to see pauses; default: off)")
    parser.add_argument("--carry-encoder", action="store_true",
                        help="keep the Emformer's state across sentences (default: fresh, as "
                             "StreamSpeech trains)")
    parser.add_argument("--fidelity", choices=FIDELITIES, default="incremental",
                        help="incremental: O(1) per segment, committed tokens keep their states "
                             "(default); exact: StreamSpeech's agent, call for call (re-decodes the "
                             "sentence at every write; needs the artifacts' sentence graphs)")


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
        _check_server_options(args)
        from echostream.runtime.triton_client import TritonTranslator, translate_remote

        client = TritonTranslator([u.strip() for u in args.server.split(",") if u.strip()])
        args.segment_ms = args.segment_ms or client.segment_ms

        def translate(on_speech=None):
            return translate_remote(client, info, args.segment_ms, args.realtime, on_event, on_speech)
    else:
        args.segment_ms = args.segment_ms or 320
        translator = _load_translator(args)
        for vocab in (translator.src_vocab, translator.tgt_vocab):
            if vocab.notice:
                print(vocab.notice, file=sys.stderr)
                break

        def translate(on_speech=None):
            return translate_file(translator, info, args.segment_ms, on_event, on_speech)
    if "out" in outputs:  # speech goes to disk as it comes: memory stays flat over hours of input
        with _speech_file(outputs["out"], args) as speech:
            run = translate(speech.write)
    else:
        run = translate()
    if args.server is not None:
        args.backend, args.precision = f"triton {args.server}", "(server's)"
    report = run.report(info, args)
    _print_summary(run, report, args)
    if "json" in outputs:
        text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        _write_atomic(outputs["json"], args.force, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return 0


# ---- running ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechNote:
    """A ``SpeechChunk`` as a run keeps it: everything but the samples."""

    num_samples: int
    sample_rate: int
    source_ms: float
    unit_ids: tuple[int, ...]
    compute_ms: float
    record: dict = field(compare=False, repr=False)  # the chunk's to_json()

    kind = "speech"

    @classmethod
    def of(cls, chunk) -> "SpeechNote":
        return cls(len(chunk.samples), chunk.sample_rate, chunk.source_ms, tuple(chunk.unit_ids),
                   chunk.compute_ms, chunk.to_json())

    @property
    def duration_ms(self) -> float:
        return 1000.0 * self.num_samples / self.sample_rate

    def to_json(self) -> dict:
        return self.record


class SpeechFile:
    """Translated speech written chunk by chunk to ``path`` (opened at the first chunk, at its
    sample rate; an empty 16 kHz file if no chunk came). ``timeline``: silences inserted where the
    output waited for the source, on SimulEval's listening timeline (``metrics.speech_intervals``:
    a chunk starts at max(its delay, the previous chunk's end), the first at its own delay).
    ``shown``: the file name errors name (the user's, not the temp file's)."""

    def __init__(self, path: str, fmt: str, subtype: str, timeline: bool, shown: Path):
        self.path, self.fmt, self.subtype, self.timeline, self.shown = path, fmt, subtype, timeline, shown
        self.file = None
        self.written = 0
        self.origin_ms = self.prev_end_ms = 0.0

    def write(self, chunk) -> None:
        if not len(chunk.samples):
            return
        if self.file is None:
            self._open(chunk.sample_rate)
            self.origin_ms = self.prev_end_ms = chunk.source_ms
        if self.timeline:
            start = max(self.prev_end_ms, chunk.source_ms)
            gap = int(round((start - self.origin_ms) * chunk.sample_rate / 1000.0)) - self.written
            if gap > 0:
                self._append(np.zeros(gap, np.float32))
            self.prev_end_ms = start + chunk.duration_ms
        self._append(chunk.samples)

    def close(self) -> None:
        if self.file is None:
            self._open(16000)
        self._checked(self.file.close)

    def abandon(self) -> None:
        """Close without finishing (the temp file is deleted by the caller)."""
        if self.file is not None:
            self.file.close()

    def _open(self, sample_rate: int) -> None:
        import soundfile

        self.file = self._checked(lambda: soundfile.SoundFile(
            self.path, "w", sample_rate, 1, self.subtype, format=self.fmt))

    def _append(self, samples: np.ndarray) -> None:
        self._checked(lambda: self.file.write(np.clip(np.asarray(samples, np.float32), -1.0, 1.0)))
        self.written += len(samples)

    def _checked(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except OSError as exc:
            raise EchoStreamError(f"cannot write {self.shown}: {exc.strerror or exc}") from None


@contextmanager
def _speech_file(path: Path, args: argparse.Namespace) -> Iterator[SpeechFile]:
    """A :class:`SpeechFile` on a temp file beside ``path``, renamed over it only when the whole
    run succeeded (never partial; an existing file only with ``--force``)."""
    with atomic_file(path) as tmp:
        speech = SpeechFile(tmp, *AUDIO_OUT_FORMATS[path.suffix.lower()], args.timeline, path)
        try:
            yield speech
        except BaseException:
            speech.abandon()
            raise
        speech.close()
        if path.exists() and not args.force:  # appeared while we were translating
            raise EchoStreamError(f"{path} exists; pass --force to overwrite it")


@dataclass
class TranslationRun:
    """Every event of one file, with the wall-clock compute time when each one was returned
    (speech events as :class:`SpeechNote`: their samples went to ``on_speech``, not into memory).

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

    def record(self, event, wall_ms: float, on_event: Callable | None = None,
               on_speech: Callable | None = None) -> None:
        """Keep ``event`` (a speech chunk's samples go to ``on_speech``, only its note is kept)."""
        if on_event is not None:
            on_event(event)
        if event.kind == "speech":
            if on_speech is not None:
                on_speech(event)
            event = SpeechNote.of(event)
        self.events.append(event)
        self.wall_ms.append(wall_ms)

    @property
    def end(self):
        ends = self.of_kind("end")
        return ends[-1][0] if ends else None

    def speech_segments(self) -> list[tuple[tuple[float, float], float]]:
        """((delay_ms, duration_ms), wall_ms) of every chunk that carries samples."""
        return [((e.source_ms, e.duration_ms), w) for e, w in self.of_kind("speech") if e.num_samples]

    def sentence_reports(self) -> list[dict[str, Any]]:
        """Per sentence (up to each ``EndOfSentence``): its texts, reason and latency metrics,
        each sentence an instance of its own (source delays from its start, compute from the end
        of the previous sentence)."""
        out, delays, wall, segments, began = [], [], [], [], 0.0
        for event, w in zip(self.events, self.wall_ms):
            if event.kind == "translation":
                delays += [max(event.source_ms, 0.0)] * len(event.token_ids)
                wall += [w - began] * len(event.token_ids)
            elif event.kind == "speech" and event.num_samples:
                segments.append(((event.source_ms, event.duration_ms), w - began))
            elif event.kind == "end_of_sentence":
                out.append(_sentence_report(event, delays, wall, segments))
                delays, wall, segments, began = [], [], [], w
        return out

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
            "sentences": self.sentence_reports(),
            "input": info.to_dict(),
            "artifacts": None if args.artifacts is None else str(args.artifacts),
            "server": getattr(args, "server", None), "backend": args.backend,
            "precision": args.precision, "segment_ms": args.segment_ms,
            "asr_text": end.asr_text if end else "",
            "translation_text": end.translation_text if end else "",
            "speech": {"file": args.out, "sample_rate": self.sample_rate,
                       "num_samples": int(sum(e.num_samples for e, _ in self.of_kind("speech"))),
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


def _sentence_report(end, delays: list[float], wall: list[float],
                     segments: list) -> dict[str, Any]:
    """SimulEval's latency within one sentence: delays from its start, its own duration."""
    from echostream.runtime.metrics import speech_latency, text_latency

    length = max(end.source_ms - end.start_ms, 1e-3)
    return {"reason": end.reason, "start_ms": end.start_ms, "end_ms": end.source_ms,
            "asr_text": end.asr_text, "translation_text": end.translation_text,
            "metrics": {"text": dict(text_latency([d - end.start_ms for d in delays], length, wall),
                                     unit="token"),
                        "speech": speech_latency([(d - end.start_ms, dur) for (d, dur), _ in segments],
                                                 length, [w for _, w in segments])}}


def translate_file(translator, info, segment_ms: int,
                   on_event: Callable[[Any], None] | None = None,
                   on_speech: Callable[[Any], None] | None = None) -> TranslationRun:
    """Feed ``info.path`` block by block (one policy segment each) and collect every event.

    Args:
        translator: a ``Translator``.
        info: the file's ``AudioInfo`` (already validated).
        segment_ms: block length; one block per policy segment, as SimulEval feeds an agent.
        on_event: called with each event as soon as it is returned.
        on_speech: called with each ``SpeechChunk`` (samples and all) before the run keeps only
            its :class:`SpeechNote`.
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
            run.record(event, 1000.0 * spent, on_event, on_speech)

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
    options = {} if args.threads is None else {"threads": args.threads}
    rules = endpoint_config(args)
    try:
        return _from_artifacts(args, rules, options)
    except ValueError as exc:
        if isinstance(exc, EchoStreamError):
            raise
        raise EchoStreamError(str(exc)) from None


def endpoint_config(args: argparse.Namespace) -> EndpointConfig | None:
    """The endpoint rules the options of :func:`add_model_options` ask for (None: off)."""
    endpoint = args.endpoint if args.endpoint is not None else args.fidelity != "exact"
    if not endpoint and args.endpoint_silence_floor is not None:
        raise EchoStreamError("--endpoint-silence-floor gates the endpoint rules; it needs "
                              "endpointing (drop --no-endpoint, or --fidelity exact)")
    if not endpoint:
        return None
    try:
        return EndpointConfig(*endpoint_thresholds(args), args.carry_encoder,
                              args.endpoint_silence_floor)
    except ValueError as exc:
        raise EchoStreamError(str(exc)) from None


def endpoint_thresholds(args: argparse.Namespace) -> tuple[float, float]:
    """(after_text_ms, no_text_ms) of ``--endpoint-after-text-ms`` / ``--endpoint-no-text-ms``,
    their defaults where not given (None there: ``--server`` tells given from default)."""
    defaults = EndpointConfig()
    after, no_text = args.endpoint_after_text_ms, args.endpoint_no_text_ms
    return (defaults.after_text_ms if after is None else after,
            defaults.no_text_ms if no_text is None else no_text)


# The model's settings: with --server they are the served repository's (`echostream triton-repo`).
_SERVED_OPTIONS = (("--backend", "backend", "onnxruntime"), ("--precision", "precision", "fp32"),
                   ("--fidelity", "fidelity", "incremental"), ("--endpoint/--no-endpoint", "endpoint", None),
                   ("--endpoint-after-text-ms", "endpoint_after_text_ms", None),
                   ("--endpoint-no-text-ms", "endpoint_no_text_ms", None),
                   ("--endpoint-silence-floor", "endpoint_silence_floor", None),
                   ("--carry-encoder", "carry_encoder", False), ("--verify", "verify", False))


def _check_server_options(args: argparse.Namespace) -> None:
    given = [flag for flag, key, default in _SERVED_OPTIONS if getattr(args, key, default) != default]
    if given:
        raise EchoStreamError(f"{', '.join(given)}: with --server the model's settings are the "
                              "served repository's (set them with `echostream triton-repo`)")


def _from_artifacts(args: argparse.Namespace, rules, options: dict):
    from echostream.runtime.translator import Translator

    return Translator.from_artifacts(args.artifacts, backend=args.backend, segment_ms=args.segment_ms,
                                     precision=args.precision, rehash=args.verify,
                                     fidelity=args.fidelity, endpoint=rules, **options)


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
    elif event.kind == "end_of_sentence" and event.reason == "pause":
        print(f"{stamp} {'sentence':<12} {event.translation_text}", flush=True)


def _print_summary(run: TranslationRun, report: dict[str, Any], args: argparse.Namespace) -> None:
    m = report["metrics"]
    speech = report["speech"]
    sentences = report["sentences"]
    if len(sentences) > 1:  # each was printed as it ended; the whole text of hours is for --json
        reasons = Counter(s["reason"].replace("_", " ") for s in sentences)
        print(f"sentences:   {len(sentences)} ("
              + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) + ")"
              + (f", texts in {args.json}" if args.json else ""))
    else:
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


