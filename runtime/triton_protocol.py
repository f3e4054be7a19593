"""What crosses the wire between the Triton model ``echostream`` and its clients (torch-free, numpy
only; shared by the model in ``runtime/triton_model.py`` and the client in ``runtime/triton_client.py``).

One sequence per audio stream (Triton's correlation id = the sequence id). Every request carries:

- ``AUDIO``: float32 ``[1, n]`` mono samples in [-1, 1] (any n >= 0, any chunking);
- ``SAMPLE_RATE``: int32 ``[1, 1]``, the rate of ``AUDIO`` (it may not change within a sequence);
- the sequence batcher's control inputs, set by Triton from the request's sequence flags:
  ``START`` (the first request creates the stream), ``END`` (the last one finishes it: its response
  ends with the ``EndOfStream`` event and the stream is dropped) and ``CORRID`` (uint64).

Every response carries the events that chunk produced:

- ``EVENTS``: ``[1, 1]`` bytes, UTF-8 JSON ``{"v": 1, "events": [...]}``; each event as
  ``Event.to_json()`` writes it (type, text, token ids, unit ids, sample counts, times) except that
  every time is the exact float (not rounded), so :func:`decode_events` rebuilds events equal to
  the in-process ones;
- ``SPEECH``: float32 ``[1, m]``, the samples of every ``speech`` event of the chunk, concatenated
  in event order (each speech event says how many are its own: ``num_samples``).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from echostream.runtime.events import (AsrText, EndOfSentence, EndOfStream, Event, SpeechChunk,
                                       TranslationText)

MODEL_NAME = "echostream"
AUDIO, SAMPLE_RATE = "AUDIO", "SAMPLE_RATE"
EVENTS, SPEECH = "EVENTS", "SPEECH"
START, END, CORRID = "START", "END", "CORRID"
WIRE_VERSION = 1
# Request header an L7 load balancer hashes on to keep a sequence on one replica (README).
SEQUENCE_HEADER = "x-echostream-sequence"


class WireError(ValueError):
    """A response that does not follow this protocol (another model, another version)."""


def _event_dict(event: Event) -> dict[str, Any]:
    d = event.to_json()
    for key in ("source_ms", "compute_ms", "start_ms"):
        if key in d:
            d[key] = float(getattr(event, key))  # exact: json writes repr(float)
    d.pop("duration_ms", None)  # derived
    return d


def encode_events(events: Sequence[Event]) -> tuple[bytes, np.ndarray]:
    """Events -> (``EVENTS`` JSON bytes, ``SPEECH`` float32 samples ``[m]``)."""
    speech = [np.asarray(e.samples, np.float32) for e in events if isinstance(e, SpeechChunk)]
    payload = {"v": WIRE_VERSION, "events": [_event_dict(e) for e in events]}
    samples = np.concatenate(speech) if speech else np.zeros(0, np.float32)
    return json.dumps(payload, ensure_ascii=False).encode("utf-8"), samples


def decode_events(payload: bytes, speech: np.ndarray) -> list[Event]:
    """(``EVENTS`` bytes, ``SPEECH`` samples) -> the events, equal to those the server produced
    (``compute_ms`` included, although events compare without it)."""
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"EVENTS is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != WIRE_VERSION:
        got = doc.get("v") if isinstance(doc, dict) else type(doc).__name__
        raise WireError(f"EVENTS wire version expected {WIRE_VERSION}, got {got!r}")
    speech = np.asarray(speech, np.float32).reshape(-1)
    events: list[Event] = []
    used = 0
    for d in doc["events"]:
        kind = d.get("type")
        if kind in ("asr", "translation"):
            cls = AsrText if kind == "asr" else TranslationText
            events.append(cls(d["text"], tuple(d["token_ids"]), d["source_ms"], d["compute_ms"],
                              int(d.get("replaces", 0))))
        elif kind == "speech":
            n = int(d["num_samples"])
            if used + n > speech.size:
                raise WireError(f"SPEECH holds {speech.size} samples, the events claim more "
                                f"({used + n})")
            events.append(SpeechChunk(speech[used:used + n].copy(), int(d["sample_rate"]),
                                      d["source_ms"], tuple(d["unit_ids"]), d["compute_ms"]))
            used += n
        elif kind == "end_of_sentence":
            events.append(EndOfSentence(d["reason"], d["source_ms"], d["compute_ms"], d["start_ms"],
                                        d["asr_text"], d["translation_text"],
                                        tuple(d["translation_ids"]), int(d["num_samples"])))
        elif kind == "end":
            events.append(EndOfStream(d["source_ms"], d["compute_ms"], d["asr_text"],
                                      d["translation_text"], tuple(d["translation_ids"]),
                                      int(d["num_samples"])))
        else:
            raise WireError(f"unknown event type {kind!r}")
    if used != speech.size:
        raise WireError(f"SPEECH holds {speech.size} samples, the events claim {used}")
    return events
