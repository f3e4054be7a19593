"""Greedy CTC collapse that gives the same tokens whether the frames come at once or in pieces.

StreamSpeech decodes its three CTC heads greedily (``agent/ctc_decoder.py``, ``ctc_generator.py``):
force ``<pad>`` and ``<unk>`` to ``-inf``, take the per-frame argmax, merge runs of equal labels,
then drop the blank (and pad). It re-decodes the whole prefix at every step; EchoStream's encoder
outputs never change once produced, so the collapse can run incrementally: the only thing a chunk
boundary needs is the previous frame's argmax, so that a run straddling two calls is merged.

Label sets (fairseq dictionaries: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3):
- ASR / ST text heads: blank 0 (the ``<s>`` slot); dropped {blank, pad}; ``</s>`` is kept, as the
  agent keeps it (it counts towards the policy's token counts).
- Unit head: blank 1004; dropped {blank, specials 0-3}; unit id = class - 4 (the agent maps classes
  through the dictionary and discards ``<s>``/``</s>``).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from echostream.contract import Config, as_config

_NO_LABEL = -1  # "no previous frame": never equal to a class index


def greedy_labels(log_probs: np.ndarray, suppress: Iterable[int] = ()) -> np.ndarray:
    """Per-frame argmax with the ``suppress`` classes (and NaNs) ruled out.

    Args:
        log_probs: ``[T, V]`` scores (log-probs or logits; only the argmax matters).
        suppress: class indices that may never win (StreamSpeech: pad, unk).
    Returns:
        ``[T]`` int64 labels.
    """
    scores = np.asarray(log_probs, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"CTC scores must be [frames, classes]; got shape {list(scores.shape)}")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    suppress = list(suppress)
    if suppress:
        scores = scores.copy()
        scores[:, suppress] = -np.inf
    return scores.argmax(axis=-1)


def collapse(labels: Iterable[int], drop: Iterable[int], previous: int = _NO_LABEL) -> list[int]:
    """Merge repeats (also with ``previous``, the label of the frame before ``labels``) and drop.

    Args:
        labels: per-frame labels ``[T]``.
        drop: labels removed after merging (blank, pad, ...).
        previous: label of the frame just before ``labels`` (-1 if none).
    Returns:
        The emitted tokens, in order.
    """
    dropped = set(int(d) for d in drop)
    out = []
    for label in (int(x) for x in labels):
        if label != previous and label not in dropped:
            out.append(label)
        previous = label
    return out


def greedy_ctc_decode(log_probs: np.ndarray, blank: int, suppress: Iterable[int] = (),
                      drop: Iterable[int] = ()) -> list[int]:
    """Whole-sequence greedy CTC (the StreamSpeech agent's decoder): ``[T, V]`` -> tokens."""
    return collapse(greedy_labels(log_probs, suppress), {blank, *drop})


class IncrementalCTC:
    """Greedy CTC collapse over a stream of frame chunks; equals :func:`greedy_ctc_decode` on the
    concatenation of all chunks.

    Args:
        blank: the blank class.
        suppress: classes forced to ``-inf`` before the argmax.
        drop: classes removed besides the blank.
    """

    def __init__(self, blank: int, suppress: Iterable[int] = (), drop: Iterable[int] = ()):
        self.blank = int(blank)
        self.suppress = tuple(int(s) for s in suppress)
        self.drop = frozenset({self.blank, *(int(d) for d in drop)})
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.frames = 0
        self.trailing_blank = 0  # frames at the end whose label is the blank (endpointing)
        self._previous = _NO_LABEL

    @property
    def count(self) -> int:
        """Tokens emitted so far (what the policy compares)."""
        return len(self.tokens)

    def accept(self, log_probs: np.ndarray) -> list[int]:
        """Consume ``[T, V]`` frame scores (T may be 0); return the tokens they complete."""
        scores = np.asarray(log_probs)
        if scores.ndim != 2:
            raise ValueError(
                f"CTC scores must be [frames, classes]; got shape {list(scores.shape)}")
        if scores.shape[0] == 0:
            return []
        labels = greedy_labels(scores, self.suppress)
        new = collapse(labels, self.drop, self._previous)
        self._previous = int(labels[-1])
        not_blank = np.flatnonzero(labels != self.blank)
        self.trailing_blank = (len(labels) - 1 - int(not_blank[-1]) if not_blank.size
                               else self.trailing_blank + len(labels))
        self.frames += int(labels.shape[0])
        self.tokens.extend(new)
        return new


def text_ctc(cfg: Config) -> IncrementalCTC:
    """ASR / ST head collapse (blank 0; pad and unk never chosen; pad dropped)."""
    c = as_config(cfg)
    return IncrementalCTC(c.ctc.blank, suppress=(c.mt.pad, c.mt.unk), drop=(c.mt.pad,))


def unit_ctc(cfg: Config) -> IncrementalCTC:
    """Unit head collapse (blank 1004; pad and unk never chosen; the 4 specials dropped).

    Emitted tokens are *classes*; subtract ``unit.unit_offset`` for unit ids.
    """
    c = as_config(cfg)
    specials = range(c.unit.unit_offset)
    return IncrementalCTC(c.unit.blank, suppress=(c.mt.pad, c.mt.unk), drop=specials)
