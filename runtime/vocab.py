"""Token vocabularies for the runtime: id -> SentencePiece-style piece -> text (no torch).

Two file formats:
- ``fairseq_dict``: fairseq's ``dict.txt``, one ``<piece> <count>`` per line; the four specials
  ``<s>=0, <pad>=1, </s>=2, <unk>=3`` are implicit before the file's entries (line i is id 4 + i).
  This is what StreamSpeech's source/target dictionaries are, and what the exporter writes.
- ``sentencepiece``: a SentencePiece ``.model`` (needs the optional ``sentencepiece`` package);
  ids are the model's own ids.

Pieces are SentencePiece-style: ``"\u2581"`` marks the start of a word, so text is the pieces
joined, ``"\u2581"`` turned into a space, and stripped (fairseq's ``sentencepiece`` post-processing).

A vocabulary may be a *placeholder* (artifacts exported from an untrained model, with generated
pieces): it decodes normally but carries a ``notice`` the CLI prints so nobody mistakes its text for
a translation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from echostream.errors import ArtifactError
from echostream.runtime.artifacts import FAIRSEQ_SPECIALS, load_fairseq_dict

WORD_START = "\u2581"
FORMATS = ("fairseq_dict", "sentencepiece")
PLACEHOLDER_NOTICE = (
    "note: the vocabulary is a placeholder (the artifacts were exported without a trained "
    "model's dictionary); text shows generated pieces, not a real transcript or translation"
)


@dataclass(frozen=True)
class Vocabulary:
    """An id -> piece table with its special ids (-1 where the vocabulary has none).

    Attributes:
        pieces: ``[V]`` piece strings, index = token id.
        bos, pad, eos, unk: special ids (fairseq: 0, 1, 2, 3).
        placeholder: True for generated placeholder vocabularies (see ``notice``).
        name: where it came from (a path), for messages.
    """

    pieces: tuple[str, ...]
    bos: int = 0
    pad: int = 1
    eos: int = 2
    unk: int = 3
    placeholder: bool = False
    name: str = ""
    _sp: Any = field(default=None, repr=False, compare=False)  # SentencePieceProcessor, if loaded

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_symbols(cls, symbols: Iterable[str], *, placeholder: bool = False,
                     name: str = "") -> "Vocabulary":
        """A fairseq symbol table (specials first, as ``load_fairseq_dict`` returns it)."""
        pieces = tuple(symbols)
        if pieces[: len(FAIRSEQ_SPECIALS)] != FAIRSEQ_SPECIALS:
            raise ValueError(
                f"{name or 'vocabulary'}: expected fairseq specials {list(FAIRSEQ_SPECIALS)} "
                f"first, got {list(pieces[:len(FAIRSEQ_SPECIALS)])}"
            )
        return cls(pieces, 0, 1, 2, 3, placeholder, name)

    @classmethod
    def load(cls, path: str | os.PathLike, format: str = "fairseq_dict", *,
             placeholder: bool = False) -> "Vocabulary":
        """Read a vocabulary file.

        Args:
            path: a fairseq ``dict.txt`` or a SentencePiece ``.model``.
            format: ``"fairseq_dict"`` or ``"sentencepiece"``.
            placeholder: mark it as a generated placeholder.
        Raises:
            ArtifactError: missing/unreadable file, bad format name, sentencepiece not installed.
        """
        path = Path(path)
        if format not in FORMATS:
            raise ArtifactError(f"{path}: vocabulary format expected one of {list(FORMATS)}, got {format!r}")
        if not path.is_file():
            raise ArtifactError(f"{path}: vocabulary file is missing")
        if format == "fairseq_dict":
            try:
                symbols = load_fairseq_dict(path)
            except UnicodeDecodeError as exc:
                raise ArtifactError(f"{path}: not a UTF-8 fairseq dictionary ({exc.reason})") from None
            return cls.from_symbols(symbols, placeholder=placeholder, name=str(path))
        return cls._load_sentencepiece(path, placeholder)

    @classmethod
    def from_artifacts_info(cls, directory: str | os.PathLike, info: str | Mapping[str, Any], *,
                            placeholder: bool = False) -> "Vocabulary":
        """A vocabulary described by a manifest entry.

        Args:
            directory: the artifacts folder.
            info: a file name (fairseq dict), or ``{"file": ..., "format": ..., "placeholder": ...}``.
            placeholder: default for the flag when ``info`` does not carry it (the manifest may
                keep one flag for both vocabularies).
        """
        if isinstance(info, (str, os.PathLike)):
            info = {"file": os.fspath(info)}
        if not isinstance(info, Mapping) or "file" not in info:
            raise ArtifactError(f"{directory}: vocabulary entry needs a 'file', got {info!r}")
        return cls.load(Path(directory) / info["file"], info.get("format", "fairseq_dict"),
                        placeholder=bool(info.get("placeholder", placeholder)))

    @classmethod
    def _load_sentencepiece(cls, path: Path, placeholder: bool) -> "Vocabulary":
        try:
            import sentencepiece
        except ImportError:
            raise ArtifactError(
                f"{path}: reading a SentencePiece model needs the 'sentencepiece' package "
                "(pip install sentencepiece)"
            ) from None
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ArtifactError(f"{path}: not a SentencePiece model ({str(exc).strip()})") from None
        pieces = tuple(sp.IdToPiece(i) for i in range(sp.GetPieceSize()))
        return cls(pieces, sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id(), placeholder,
                   str(path), sp)

    # ---- lookup --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def specials(self) -> dict[str, int]:
        """Special name -> id, for the specials this vocabulary has."""
        named = {"bos": self.bos, "pad": self.pad, "eos": self.eos, "unk": self.unk}
        return {k: v for k, v in named.items() if v >= 0}

    def is_special(self, token_id: int) -> bool:
        return token_id in (self.bos, self.pad, self.eos) and token_id >= 0

    def piece(self, token_id: int) -> str:
        """The piece of one id (ValueError naming the valid range otherwise)."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self.pieces):
            raise ValueError(f"token id {token_id} out of range [0, {len(self.pieces)}) "
                             f"for {self.name or 'vocabulary'}")
        return self.pieces[token_id]

    def is_word_start(self, token_id: int) -> bool:
        """True if the piece begins a new word (starts with ``"\u2581"``)."""
        return self.piece(token_id).startswith(WORD_START)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token sequence: ``<s>``, ``<pad>``, ``</s>`` dropped, pieces joined,
        ``"\u2581"`` -> space, stripped (``<unk>`` stays visible as its piece)."""
        kept = [int(i) for i in ids if not self.is_special(int(i))]
        for i in kept:
            self.piece(i)  # range check with a clear message
        if self._sp is not None:  # handles byte-fallback pieces and SentencePiece normalisation
            return self._sp.DecodeIds(kept).strip()
        return "".join(self.pieces[i] for i in kept).replace(WORD_START, " ").strip()

    @property
    def notice(self) -> str | None:
        """A one-line warning for placeholder vocabularies, else None."""
        if not self.placeholder:
            return None
        return PLACEHOLDER_NOTICE
