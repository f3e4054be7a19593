"""The Triton Python-backend model ``echostream``: one :class:`Translator` per model instance, one
:class:`Stream` per sequence, one ``decode_streams`` round per ``execute``.

The model repository written by ``echostream triton-repo`` has a ``model.py`` that only imports
:class:`TritonPythonModel` from here, so the code that serves is the installed ``echostream``.

Triton's sequence batcher (``oldest`` strategy) routes every request of a sequence to the same
model instance and gives one ``execute`` call the next request of up to ``max_batch_size``
sequences. :class:`SequenceHost` (no Triton in it) keeps correlation id -> stream:

- ``START`` creates the stream (a restarted id replaces its old stream), a request without it must
  name a live sequence;
- every request's ``AUDIO`` goes into its stream (a refused chunk -- NaN, a changed rate, a wrong
  shape -- gets an error response and leaves the stream as it was), then all the streams of the
  call are decoded together by one ``Translator.decode_streams`` (every stage once per round over
  all of them); a stream whose decoding fails gets an error response and is dropped, the others
  carry on;
- ``END`` finishes the stream (its response ends with ``EndOfStream``) and drops it;
- a sequence idle longer than the batcher's ``max_sequence_idle_microseconds`` (a client that
  vanished) is dropped by a reaper thread: Triton frees the batcher slot but never tells the model,
  so the model keeps its own clock.

Live sequences and what became of them are exported as Triton custom metrics on the metrics port:
``echostream_live_sequences`` (gauge) and ``echostream_sequences_total{outcome=started|ended|
failed|reclaimed}`` (counters), per model instance.
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from echostream.errors import ArtifactError, EchoStreamError
from echostream.runtime import triton_protocol as wire
from echostream.runtime.events import Event
from echostream.runtime.heap import trim_heap

REAP_GRACE_S = 0.25  # beyond the batcher's idle limit: Triton releases its slot first
OUTCOMES = ("started", "ended", "failed", "reclaimed")


class RequestError(EchoStreamError):
    """One request cannot be served; ``code`` names the Triton error kind."""

    def __init__(self, message: str, code: str = "INVALID_ARG"):
        super().__init__(message)
        self.code = code


@dataclass
class Chunk:
    """One request as the host sees it."""

    corrid: int
    start: bool
    end: bool
    sample_rate: int
    audio: np.ndarray  # float32 [n]


@dataclass
class _Live:
    stream: Any
    last_seen: float
    chunks: int = 0


@dataclass
class HostStats:
    live: int = 0
    totals: dict = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


class SequenceHost:
    """Correlation id -> stream, and the batched decode of one ``execute`` (see the module doc).

    Args:
        translator: the instance's ``Translator``.
        idle_s: the batcher's ``max_sequence_idle_microseconds`` in seconds; a sequence idle
            ``idle_s + REAP_GRACE_S`` is reclaimed by :meth:`reap`.
        clock: monotonic seconds (tests pass their own).
        log: one line per noteworthy thing (reclaimed or failed sequences).
        on_change: called with :class:`HostStats` after every change (metrics).
    """

    def __init__(self, translator, idle_s: float, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = print,
                 on_change: Callable[[HostStats], None] | None = None):
        self.translator, self.idle_s = translator, float(idle_s)
        self.clock, self.log, self.on_change = clock, log, on_change
        self.live: dict[int, _Live] = {}
        self.stats = HostStats()
        self.lock = threading.Lock()

    # ---- one execute --------------------------------------------------------------------------

    def handle(self, chunks: Sequence[Chunk]) -> list[list[Event] | RequestError]:
        """Serve one ``execute``: each chunk's new events, or the error of its request."""
        outcomes: list[list[Event] | RequestError | None] = [None] * len(chunks)
        with self.lock:
            pending = []
            for i, chunk in enumerate(chunks):
                try:
                    self._open(chunk)
                    pending.append(i)
                except RequestError as exc:
                    outcomes[i] = exc
            # Triton never puts two requests of one sequence in a batch; if it ever did, the later
            # one waits for the next round so that every chunk gets exactly its own events.
            while pending:
                this_round, later, seen = [], [], set()
                for i in pending:
                    (later if chunks[i].corrid in seen else this_round).append(i)
                    seen.add(chunks[i].corrid)
                self._round(chunks, this_round, outcomes)
                pending = later
            self._changed()
        return outcomes  # type: ignore[return-value]

    def _open(self, chunk: Chunk) -> None:
        if chunk.start:
            if chunk.corrid in self.live:
                self.log(f"echostream: sequence {chunk.corrid} restarted (START on a live id): "
                         "its old stream is dropped")
                self._drop(chunk.corrid, "reclaimed")
            self.live[chunk.corrid] = _Live(self.translator.create_stream(), self.clock())
            self.stats.totals["started"] += 1
        elif chunk.corrid not in self.live:
            raise RequestError(
                f"sequence {chunk.corrid} is not live in this model instance: it was never started "
                f"(send START first), already ended or failed, or was idle longer than "
                f"{self.idle_s:g} s and reclaimed", code="NOT_FOUND")

    def _round(self, chunks: Sequence[Chunk], indices: list[int], outcomes: list) -> None:
        from echostream.runtime.translator import StreamDecodeError

        batch: list[int] = []
        for i in indices:
            chunk = chunks[i]
            live = self.live.get(chunk.corrid)
            if live is None:  # dropped by an earlier round of this call
                outcomes[i] = RequestError(f"sequence {chunk.corrid} failed earlier in this batch",
                                           code="NOT_FOUND")
                continue
            live.chunks += 1
            try:
                live.stream.accept_waveform(chunk.sample_rate, chunk.audio)
            except (ValueError, EchoStreamError) as exc:
                outcomes[i] = RequestError(f"sequence {chunk.corrid}, chunk {live.chunks}: {exc}")
                if chunk.end:
                    self._drop(chunk.corrid, "failed")
                continue
            if chunk.end:
                live.stream.input_finished()
            batch.append(i)
        if not batch:
            return
        streams = [self.live[chunks[i].corrid].stream for i in batch]
        failures: dict[int, BaseException] = {}
        try:
            results = self.translator.decode_streams(streams)
        except StreamDecodeError as exc:
            results, failures = exc.results, exc.failures
        now = self.clock()
        for k, i in enumerate(batch):
            corrid = chunks[i].corrid
            if k in failures:
                error = failures[k]
                outcomes[i] = RequestError(f"sequence {corrid}: decoding failed, the sequence is "
                                           f"dropped: {type(error).__name__}: {error}",
                                           code="INTERNAL")
                self.log(f"echostream: sequence {corrid} failed: {type(error).__name__}: {error}")
                self._drop(corrid, "failed")
                continue
            outcomes[i] = results[k]
            if chunks[i].end:
                self._drop(corrid, "ended")
            else:
                self.live[corrid].last_seen = now

    def _drop(self, corrid: int, outcome: str) -> None:
        if self.live.pop(corrid, None) is not None:
            self.stats.totals[outcome] += 1

    def _changed(self) -> None:
        self.stats.live = len(self.live)
        if self.on_change is not None:
            self.on_change(self.stats)

    # ---- idle sequences --------------------------------------------------------------------------

    def reap(self) -> list[int]:
        """Drop every sequence idle longer than ``idle_s + REAP_GRACE_S``; returns their ids."""
        with self.lock:
            now = self.clock()
            idle = [c for c, live in self.live.items()
                    if now - live.last_seen > self.idle_s + REAP_GRACE_S]
            for corrid in idle:
                seconds = now - self.live[corrid].last_seen
                self._drop(corrid, "reclaimed")
                self.log(f"echostream: sequence {corrid} idle for {seconds:.1f} s (limit "
                         f"{self.idle_s:g} s): reclaimed")
            if idle:
                self._changed()
            return idle


# ---- loading from the model config ---------------------------------------------------------------


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """``parameters`` of a Triton model config (JSON form) as plain strings."""
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def artifacts_path(params: dict[str, str], model_dir: Path, version: str) -> Path:
    """The artifacts folder: absolute as written, or relative to the model's version folder."""
    path = Path(params["artifacts"])
    return path if path.is_absolute() else model_dir / version / path


def check_manifest(artifacts: Path, expected_sha256: str) -> None:
    """The artifacts are those the repository was generated from (``manifest.json`` unchanged)."""
    manifest = artifacts / "manifest.json"
    if not manifest.is_file():
        raise ArtifactError(f"{manifest}: manifest is missing (the repository points at "
                            f"{artifacts}; regenerate it with `echostream triton-repo`)")
    got = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if expected_sha256 and got != expected_sha256:
        raise ArtifactError(f"{manifest}: sha256 expected {expected_sha256}, got {got} (the artifacts "
                            "changed after `echostream triton-repo`; regenerate the repository)")


def load_translator(params: dict[str, str], model_dir: Path, version: str,
                    device_id: int | None = None, instances: int = 1):
    """The instance's translator: artifacts checked (manifest sha256, then every file re-hashed).
    ONNX Runtime gets ``threads`` intra-op threads, by default the physical cores shared out
    among the ``instances``."""
    from echostream.runtime.translator import Translator

    root = artifacts_path(params, model_dir, version)
    check_manifest(root, params.get("manifest_sha256", ""))
    backend = params.get("stage_backend", "onnxruntime")
    options: dict[str, Any] = {}
    if backend == "onnxruntime":
        from echostream.runtime.onnxruntime_backend import physical_cores

        options["threads"] = int(params.get("threads") or max(1, physical_cores() // instances))
    if backend == "tensorrt" and device_id is not None:
        options["device"] = device_id
    return Translator.from_artifacts(root, backend=backend, segment_ms=int(params["segment_ms"]),
                                     precision=params.get("precision", "fp32"), rehash=True,
                                     fidelity=params.get("fidelity", "incremental"),
                                     endpoint=endpoint_rules(params), **options)


def endpoint_rules(params: dict[str, str]):
    """The repository's endpoint rules (``triton-repo`` writes them as JSON, or ``off``)."""
    from echostream.runtime.endpoint import EndpointConfig

    text = params.get("endpoint", "off")
    return None if text == "off" else EndpointConfig(**json.loads(text))


def instance_count(model_config: dict[str, Any]) -> int:
    return sum(int(g.get("count", 1)) for g in model_config.get("instance_group") or [{}])


def idle_seconds(model_config: dict[str, Any]) -> float:
    micro = int((model_config.get("sequence_batching") or {}).get(
        "max_sequence_idle_microseconds") or 1_000_000)  # Triton's default: 1 s
    return micro / 1e6


# ---- the Triton side -------------------------------------------------------------------------------


class TritonPythonModel:
    """What Triton's Python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        device = int(args["model_instance_device_id"]) \
            if args.get("model_instance_kind") == "GPU" else None
        self.instance = args.get("model_instance_name", args.get("model_name", "echostream"))
        import numpy

        self._log(f"echostream: instance {self.instance} on Python {sys.version.split()[0]} "
                  f"({sys.prefix}), NumPy {numpy.__version__}")
        try:
            translator = load_translator(params, Path(args["model_repository"]),
                                         args["model_version"], device,
                                         instance_count(config))
        except EchoStreamError as exc:
            # One line in the server log naming the problem (a tampered file: its sha256 line).
            raise pb_utils.TritonModelException(f"echostream: {exc}") from None
        self._metrics()
        self.host = SequenceHost(translator, idle_seconds(config), log=self._log,
                                 on_change=self._publish)
        self._publish(self.host.stats)
        self._stop = threading.Event()
        period = min(1.0, max(0.05, self.host.idle_s / 4))
        self._reaper = threading.Thread(target=self._reap_loop, args=(period,), daemon=True,
                                        name="echostream-reaper")
        self._reaper.start()
        self._log(f"echostream: instance {self.instance} ready: "
                  f"{translator.config.get('name', root_name(params))} on "
                  f"{params.get('stage_backend', 'onnxruntime')}, segment {params['segment_ms']} ms, "
                  f"idle limit {self.host.idle_s:g} s")

    def execute(self, requests):
        pb = self.pb
        chunks, errors = [], {}
        for i, request in enumerate(requests):
            try:
                chunks.append((i, _chunk(pb, request)))
            except RequestError as exc:
                errors[i] = exc
        outcomes = dict(zip((i for i, _ in chunks), self.host.handle([c for _, c in chunks])))
        outcomes.update(errors)
        responses = []
        for i in range(len(requests)):
            outcome = outcomes[i]
            if isinstance(outcome, RequestError):
                code = getattr(pb.TritonError, outcome.code, None)
                error = pb.TritonError(str(outcome), code) if code is not None \
                    else pb.TritonError(str(outcome))
                responses.append(pb.InferenceResponse(output_tensors=[], error=error))
                continue
            payload, speech = wire.encode_events(outcome)
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor(wire.EVENTS, np.array([[payload]], dtype=np.object_)),
                pb.Tensor(wire.SPEECH, speech.reshape(1, -1))]))
        return responses

    def finalize(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # ---- helpers ---------------------------------------------------------------------------------

    def _reap_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                if self.host.reap():
                    trim_heap()  # what the reclaimed streams held goes back to the system
            except Exception as exc:  # never let the reaper die silently
                self._log(f"echostream: reaper error: {type(exc).__name__}: {exc}")

    def _metrics(self) -> None:
        pb = self.pb
        labels = {"model": "echostream", "instance": self.instance}
        self._live_family = pb.MetricFamily(
            name="echostream_live_sequences", description="sequences with a live stream",
            kind=pb.MetricFamily.GAUGE)
        self._live_metric = self._live_family.Metric(labels=labels)
        self._total_family = pb.MetricFamily(
            name="echostream_sequences_total", description="sequences by what became of them",
            kind=pb.MetricFamily.COUNTER)
        self._total_metrics = {o: self._total_family.Metric(labels=dict(labels, outcome=o))
                               for o in OUTCOMES}
        self._published = dict.fromkeys(OUTCOMES, 0)

    def _publish(self, stats: HostStats) -> None:
        self._live_metric.set(stats.live)
        for outcome, metric in self._total_metrics.items():
            delta = stats.totals[outcome] - self._published[outcome]
            if delta:
                metric.increment(delta)
                self._published[outcome] = stats.totals[outcome]

    def _log(self, message: str) -> None:
        print(message, flush=True)


def root_name(params: dict[str, str]) -> str:
    return Path(params.get("artifacts", "?")).name


def _chunk(pb, request) -> Chunk:
    def get(name: str) -> np.ndarray:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"input {name} is missing")
        return tensor.as_numpy()

    audio = get(wire.AUDIO)
    if audio.ndim != 2 or audio.shape[0] != 1:
        raise RequestError(f"AUDIO expected shape [1, n] (one chunk of one sequence), "
                           f"got {list(audio.shape)}")
    rate = get(wire.SAMPLE_RATE).reshape(-1)
    if rate.size != 1:
        raise RequestError(f"SAMPLE_RATE expected one value, got {rate.size}")
    return Chunk(int(get(wire.CORRID).reshape(-1)[0]), bool(get(wire.START).reshape(-1)[0]),
                 bool(get(wire.END).reshape(-1)[0]), int(rate[0]),
                 np.ascontiguousarray(audio[0], dtype=np.float32))
