"""A small client for the Triton model ``echostream`` (torch-free; needs ``tritonclient[grpc]``).

One gRPC bidirectional stream per audio stream, carrying one Triton *sequence* (its correlation id
is the sequence id): the first request has the START flag, the last one END. Each response holds
the events of its chunk, rebuilt exactly as the in-process ``Translator.decode`` returns them
(``runtime/triton_protocol.py``)::

    client = TritonTranslator("127.0.0.1:8001")
    stream = client.create_stream()
    for block in blocks:                                   # any rate, any chunking
        for event in stream.accept_waveform(16000, block): ...
    events = stream.finish()                               # ... EndOfSentence, EndOfStream
    stream.close()

``send`` / ``receive`` pipeline chunks without waiting for each answer (a live microphone).

**Several servers** (replicas of one repository): ``TritonTranslator([url1, url2, ...])`` routes
each sequence by its id with rendezvous hashing, so every request of a sequence goes to the same
server (sequence-sticky), and removing a server moves only its own sequences. The stream's gRPC
metadata carries the id as ``x-echostream-sequence`` for a load balancer in front of the replicas
to hash on (README, "Serving at scale").

Errors are one line (:class:`TritonClientError`): a server that cannot be reached, a chunk the
server refused (NaN samples, an unknown or reclaimed sequence), a server that went away
mid-stream, or no answer within ``timeout_s``.
"""
from __future__ import annotations

import hashlib
import queue
import secrets
from typing import Any, Sequence

import numpy as np

from echostream.errors import BackendUnavailable, EchoStreamError
from echostream.runtime import triton_protocol as wire
from echostream.runtime.events import Event

TRANSPORT_STATUSES = ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL")


class TritonClientError(EchoStreamError):
    """The server could not be reached, refused a chunk, or went away."""


class ServerGone(TritonClientError):
    """The connection to the server failed (unreachable, or lost mid-stream)."""


class ChunkRefused(TritonClientError):
    """The server answered a chunk with an error (the sequence may be gone)."""


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        raise BackendUnavailable(f"the Triton client is not installed ({exc}); it needs pip install "
                                 "'echostream[serve]' (tritonclient[grpc])") from None
    return grpcclient, InferenceServerException


def new_sequence_id() -> int:
    """A random non-zero 63-bit correlation id (0 means "no sequence" to Triton)."""
    return secrets.randbits(63) or 1


def route(sequence_id: int, urls: Sequence[str]) -> str:
    """Rendezvous (highest random weight) hashing: the server a sequence belongs to. Depends only
    on the id and the server list, so every request of a sequence goes to one server."""
    if not urls:
        raise ValueError("no servers to route to")
    return max(urls, key=lambda u: hashlib.sha256(f"{u}|{sequence_id}".encode()).digest())


def _message(exc: Exception) -> str:
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return " ".join(str(text).split())


class TritonTranslator:
    """The served model on one server or several (routed by sequence id).

    Args:
        urls: ``HOST:PORT`` of a server's gRPC endpoint, or a list of them (replicas).
        model: the model name in the repository.
        timeout_s: the longest wait for one response.
    """

    def __init__(self, urls: str | Sequence[str], model: str = wire.MODEL_NAME,
                 timeout_s: float = 60.0):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("TritonTranslator needs at least one server URL")
        self.model, self.timeout_s = model, float(timeout_s)

    def route(self, sequence_id: int) -> str:
        return route(sequence_id, self.urls)

    def model_parameters(self, url: str | None = None) -> dict[str, str]:
        """The model's config ``parameters`` (``segment_ms``, ``stage_backend``, ...)."""
        grpcclient, error = _grpc()
        url = url or self.urls[0]
        client = grpcclient.InferenceServerClient(url)
        try:
            config = client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)
        except error as exc:
            raise _unreachable(url, exc) from None
        finally:
            client.close()
        params = config.get("config", config).get("parameters", {})
        return {k: v.get("string_value", "") for k, v in params.items()}

    @property
    def segment_ms(self) -> int:
        return int(self.model_parameters().get("segment_ms", "320"))

    def create_stream(self, sequence_id: int | None = None) -> "RemoteStream":
        sequence_id = new_sequence_id() if sequence_id is None else int(sequence_id)
        return RemoteStream(self.route(sequence_id), self.model, sequence_id, self.timeout_s)


def _unreachable(url: str, exc: Exception) -> ServerGone:
    return ServerGone(f"cannot reach the Triton server at {url}: {_message(exc)}")


class RemoteStream:
    """One audio stream served by a Triton server (see the module doc). Not thread-safe: drive it
    from one thread (``receive`` may run in another)."""

    def __init__(self, url: str, model: str, sequence_id: int, timeout_s: float = 60.0):
        grpcclient, self._error_type = _grpc()
        self._grpc = grpcclient
        self.url, self.model, self.sequence_id, self.timeout_s = url, model, sequence_id, timeout_s
        self.sample_rate: int | None = None
        self.sent = self.received = 0
        self.finished = False
        self._broken: TritonClientError | None = None
        self._responses: queue.Queue = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        try:
            if not self._client.is_server_live(client_timeout=timeout_s):
                raise ServerGone(f"the Triton server at {url} is not live")
            self._client.start_stream(callback=self._on_response,
                                      headers={wire.SEQUENCE_HEADER: str(sequence_id)})
        except self._error_type as exc:
            self._client.close()
            raise _unreachable(url, exc) from None

    # ---- the synchronous API (like Translator.decode) ----------------------------------------

    def accept_waveform(self, sample_rate: int, samples: np.ndarray) -> list[Event]:
        """Send one chunk and return the events it produced."""
        self.send(sample_rate, samples)
        return self.receive()

    def finish(self, sample_rate: int | None = None, samples: np.ndarray | None = None) -> list[Event]:
        """Send the last chunk (END; may be empty) and return its events, through EndOfStream."""
        self.send(sample_rate, samples, end=True)
        events: list[Event] = []
        while self.received < self.sent:
            events = self.receive()
        return events

    # ---- pipelined ----------------------------------------------------------------------------

    def send(self, sample_rate: int | None, samples: np.ndarray | None, end: bool = False) -> int:
        """Queue one chunk (without waiting for its answer); returns its index."""
        if self._broken is not None:
            raise self._broken
        if self.finished:
            raise TritonClientError(f"sequence {self.sequence_id} already ended")
        rate = sample_rate if sample_rate is not None else self.sample_rate or 16000
        if self.sample_rate is None:
            self.sample_rate = int(rate)
        audio = np.zeros(0, np.float32) if samples is None else np.asarray(samples, np.float32)
        audio = np.ascontiguousarray(audio.reshape(1, -1))
        g = self._grpc
        inputs = [g.InferInput(wire.AUDIO, list(audio.shape), "FP32"),
                  g.InferInput(wire.SAMPLE_RATE, [1, 1], "INT32")]
        inputs[0].set_data_from_numpy(audio)
        inputs[1].set_data_from_numpy(np.array([[int(rate)]], np.int32))
        try:
            self._client.async_stream_infer(
                self.model, inputs, request_id=f"{self.sequence_id}:{self.sent}",
                sequence_id=self.sequence_id, sequence_start=self.sent == 0, sequence_end=end)
        except self._error_type as exc:
            raise self._gone(self._transport_error() or exc) from None
        self.sent += 1
        self.finished = end
        return self.sent - 1

    def receive(self, timeout_s: float | None = None) -> list[Event]:
        """The events of the oldest unanswered chunk (waits for them)."""
        if self.received >= self.sent:
            raise TritonClientError(f"sequence {self.sequence_id}: nothing was sent that is not "
                                    "answered yet")
        if self._broken is not None:
            raise self._broken
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            result, error = self._responses.get(timeout=timeout_s)
        except queue.Empty:
            self._broken = ServerGone(
                f"no answer from the Triton server at {self.url} within {timeout_s:g} s "
                f"(sequence {self.sequence_id}, chunk {self.received + 1} of {self.sent})")
            raise self._broken from None
        index = self.received
        self.received += 1
        if error is not None:
            status = error.status() if hasattr(error, "status") else None
            if status and any(s in str(status) for s in TRANSPORT_STATUSES):
                raise self._gone(error)
            raise ChunkRefused(f"the server refused chunk {index + 1} of sequence "
                               f"{self.sequence_id}: {_message(error)}")
        try:
            payload = result.as_numpy(wire.EVENTS).reshape(-1)[0]
            speech = result.as_numpy(wire.SPEECH)
            return wire.decode_events(payload, speech if speech is not None else np.zeros(0))
        except (wire.WireError, KeyError, IndexError, AttributeError, ValueError) as exc:
            raise TritonClientError(f"unexpected response for chunk {index + 1} of sequence "
                                    f"{self.sequence_id}: {exc}") from None

    def pending(self) -> int:
        """Answers that have arrived and wait for ``receive``."""
        return self._responses.qsize()

    def close(self) -> None:
        """Close the gRPC stream (an unfinished sequence is reclaimed by the server after its
        idle timeout)."""
        try:
            self._client.stop_stream(cancel_requests=True)
        except Exception:
            pass
        try:
            self._client.close()
        except Exception:
            pass

    def __enter__(self) -> "RemoteStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------

    def _on_response(self, result, error) -> None:
        self._responses.put((result, error))

    def _transport_error(self) -> Exception | None:
        """The stream's own account of a lost connection (the callback got it; the error that a
        later send raises only says the stream is no longer valid)."""
        for _result, error in list(self._responses.queue):
            status = error.status() if error is not None and hasattr(error, "status") else None
            if status and any(s in str(status) for s in TRANSPORT_STATUSES):
                return error
        return None

    def _gone(self, exc: Exception) -> ServerGone:
        if self._broken is None:
            self._broken = ServerGone(
                f"the Triton server at {self.url} went away mid-stream (sequence "
                f"{self.sequence_id}, {self.received} of {self.sent} chunks answered): "
                f"{_message(exc)}")
        return self._broken  # type: ignore[return-value]



# ---- a file through a server (``echostream translate --server``) ----------------------------------


def translate_remote(client: TritonTranslator, info, segment_ms: int, realtime: bool = False,
                     on_event=None, on_speech=None):
    """Stream ``info.path`` to the server as one sequence, in blocks of ``segment_ms``; returns the
    same ``TranslationRun`` as the in-process ``translate_file``.

    Without ``realtime`` each block waits for its answer (``wall_ms``: the time spent in those
    round trips, as in-process it is the time spent decoding); with ``realtime`` a block is sent
    when its audio would have been complete on a live microphone and answers are taken as they
    come (``wall_ms``: how far an event arrived behind its ``source_ms`` on that clock).
    ``on_event`` / ``on_speech`` as in ``translate_file`` (the run keeps a ``SpeechNote`` of each
    speech chunk, its samples go to ``on_speech``).
    """
    import time

    from echostream.runtime.audio import iter_audio_blocks
    from echostream.runtime.translate_cli import TranslationRun

    run = TranslationRun()
    stream = client.create_stream()
    spent = 0.0
    start = time.perf_counter()

    def record(events: list[Event], wall_ms) -> None:
        for event in events:
            run.record(event, wall_ms(event), on_event, on_speech)

    def arrived(event: Event) -> float:
        return max(0.0, 1000.0 * (time.perf_counter() - start) - event.source_ms)

    try:
        offset = 0
        for block in iter_audio_blocks(info.path, segment_ms / 1000.0):
            offset += block.shape[0]
            if realtime:
                time.sleep(max(0.0, start + offset / info.sample_rate - time.perf_counter()))
                stream.send(info.sample_rate, block)
                while stream.pending():
                    record(stream.receive(), arrived)
            else:
                t0 = time.perf_counter()
                events = stream.accept_waveform(info.sample_rate, block)
                spent += time.perf_counter() - t0
                record(events, lambda _e: 1000.0 * spent)
        if realtime:
            stream.send(info.sample_rate, None, end=True)
            while stream.received < stream.sent:
                record(stream.receive(), arrived)
        else:
            t0 = time.perf_counter()
            events = stream.finish(info.sample_rate)
            spent += time.perf_counter() - t0
            record(events, lambda _e: 1000.0 * spent)
    finally:
        stream.close()
    run.source_ms = 1000.0 * info.frames / info.sample_rate
    run.sample_rate = next((e.sample_rate for e in run.events if e.kind == "speech"), 16000)
    return run
