"""Runtime vocabularies: fairseq dict and SentencePiece model, decoding, placeholders, errors."""
from __future__ import annotations

import pytest

from echostream.errors import ArtifactError
from echostream.runtime.vocab import Vocabulary

PIECES = ["\u2581hello", "\u2581wor", "ld", ",", "\u2581again"]


@pytest.fixture
def fairseq_dict(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("".join(f"{p} {100 - i}\n" for i, p in enumerate(PIECES)), encoding="utf-8")
    return path


def test_fairseq_dict_ids_and_decoding(fairseq_dict):
    v = Vocabulary.load(fairseq_dict)
    assert v.size == len(v) == 4 + len(PIECES)
    assert v.specials == {"bos": 0, "pad": 1, "eos": 2, "unk": 3}
    assert v.piece(4) == "\u2581hello" and v.piece(6) == "ld"
    assert [v.is_word_start(i) for i in range(4, 9)] == [True, True, False, False, True]
    # <s>/<pad>/</s> are dropped, pieces joined, the word marker becomes a space
    assert v.decode([0, 4, 5, 6, 7, 8, 2, 1]) == "hello world, again"
    assert v.decode([5, 3, 6]) == "wor<unk>ld"
    assert v.decode([]) == ""
    assert not v.placeholder and v.notice is None


def test_out_of_range_ids(fairseq_dict):
    v = Vocabulary.load(fairseq_dict)
    with pytest.raises(ValueError, match=r"token id 9 out of range \[0, 9\)"):
        v.decode([4, 9])
    with pytest.raises(ValueError, match="out of range"):
        v.piece(-1)


def test_from_artifacts_info_forms(fairseq_dict):
    folder = fairseq_dict.parent
    plain = Vocabulary.from_artifacts_info(folder, "dict.txt", placeholder=True)
    assert plain.placeholder and "placeholder" in plain.notice
    full = Vocabulary.from_artifacts_info(folder, {"file": "dict.txt", "format": "fairseq_dict",
                                                   "placeholder": False}, placeholder=True)
    assert not full.placeholder and full.pieces == plain.pieces
    with pytest.raises(ArtifactError, match="needs a 'file'"):
        Vocabulary.from_artifacts_info(folder, {"format": "fairseq_dict"})


def test_from_symbols_needs_fairseq_specials():
    v = Vocabulary.from_symbols(["<s>", "<pad>", "</s>", "<unk>", "\u2581a"])
    assert v.decode([4]) == "a"
    with pytest.raises(ValueError, match="fairseq specials"):
        Vocabulary.from_symbols(["\u2581a", "\u2581b"])


def test_file_errors(tmp_path, fairseq_dict):
    with pytest.raises(ArtifactError, match="vocabulary file is missing"):
        Vocabulary.load(tmp_path / "nope.txt")
    with pytest.raises(ArtifactError, match=r"format expected one of \['fairseq_dict', 'sentencepiece'\]"):
        Vocabulary.load(fairseq_dict, "bpe")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage 1\n")
    with pytest.raises(ArtifactError, match="not a UTF-8 fairseq dictionary"):
        Vocabulary.load(binary)


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is optional")
    corpus = ["the cat sat on the mat", "a dog ate the hat", "the cat ate a rat"] * 30
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(prefix),
                                   vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    v = Vocabulary.load(f"{prefix}.model", "sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    ids = sp.encode("the cat ate the mat")
    assert v.decode(ids) == "the cat ate the mat"
    assert v.size == sp.get_piece_size()
    assert v.specials == {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}  # no pad
    assert v.is_word_start(ids[0]) and v.piece(ids[0]).startswith("\u2581")
    # bos/eos ids are dropped like the fairseq specials
    assert v.decode([sp.bos_id(), *ids, sp.eos_id()]) == "the cat ate the mat"
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="not a SentencePiece model"):
        Vocabulary.load(broken, "sentencepiece")
