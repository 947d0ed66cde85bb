"""The word vocabulary of the CNN-LSTM and the CLIP-Transformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.captions import pre_caption
from models.word_vocab import EOS, PAD, SOS, SPECIALS, UNK, VOCAB_FILE, VocabError, WordVocab, vocabulary_source

CAPTIONS = [
    "Axial CT of the head. No focal lesion.",
    "Coronal MR of the chest: small hyperintense lesion in the left lung.",
    "Axial CT of the abdomen. No focal lesion.",
]


def test_specials_come_first_then_words_by_frequency_then_alphabet() -> None:
    vocab = WordVocab.build(CAPTIONS)
    assert vocab.itos[:4] == list(SPECIALS) == ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]
    assert (PAD, SOS, EOS, UNK) == (0, 1, 2, 3)
    # "the" occurs 4 times, "lesion" and "of" 3 times (alphabetical between them), "abdomen" once.
    assert vocab.words[:3] == ["the", "lesion", "of"]
    assert vocab.words.index("abdomen") > vocab.words.index("no")
    assert len(vocab) == 4 + len({w for c in CAPTIONS for w in pre_caption(c).split()})
    assert WordVocab.build(list(reversed(CAPTIONS))) == vocab  # order of captions does not change the ids


def test_min_count_sends_rare_words_to_unk() -> None:
    vocab = WordVocab.build(CAPTIONS, min_count=2)
    assert "lung" not in vocab.stoi and "lesion" in vocab.stoi
    ids = vocab.encode("small lesion in the lung")
    assert ids[0] == SOS and ids[-1] == EOS
    assert ids[1:-1] == [UNK, vocab.stoi["lesion"], UNK, vocab.stoi["the"], UNK]
    assert vocab.decode(ids) == "lesion the"  # <UNK> is a special: left out


def test_encode_normalises_like_pre_caption_and_truncates_keeping_eos() -> None:
    vocab = WordVocab.build(CAPTIONS)
    text = "AXIAL  ct. of the HEAD!"
    assert vocab.decode(vocab.encode(text)) == pre_caption(text) == "axial ct of the head"
    assert vocab.encode(text, max_length=4) == [SOS, vocab.stoi["axial"], vocab.stoi["ct"], EOS]
    assert vocab.encode("", max_length=2) == [SOS, EOS]
    with pytest.raises(VocabError, match="max_length"):
        vocab.encode(text, max_length=1)


def test_encode_batch_pads_and_reports_lengths() -> None:
    vocab = WordVocab.build(CAPTIONS)
    ids, lengths = vocab.encode_batch(["no focal lesion", "axial ct of the head no focal lesion"])
    assert ids.dtype == torch.long and ids.shape == (2, 10)
    assert lengths.tolist() == [5, 10]
    assert ids[0, 5:].tolist() == [PAD] * 5
    assert ids[0, 4].item() == EOS and ids[1, 9].item() == EOS
    assert vocab.decode_batch(ids) == ["no focal lesion", "axial ct of the head no focal lesion"]
    with pytest.raises(VocabError, match="empty"):
        vocab.encode_batch([])


def test_decode_stops_at_eos_and_skips_specials() -> None:
    vocab = WordVocab.build(CAPTIONS)
    no, lesion = vocab.stoi["no"], vocab.stoi["lesion"]
    assert vocab.decode([SOS, no, PAD, lesion, EOS, no, no]) == "no lesion"
    assert vocab.decode(torch.tensor([no, lesion])) == "no lesion"  # no <EOS>: everything
    assert vocab.decode([EOS, no]) == ""
    with pytest.raises(VocabError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = WordVocab.build(CAPTIONS, min_count=2)
    vocab.save(tmp_path)
    loaded = WordVocab.load(tmp_path)
    assert loaded == vocab and loaded.itos == vocab.itos and loaded.min_count == 2
    assert json.loads((tmp_path / VOCAB_FILE).read_text())["specials"] == list(SPECIALS)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE):
        WordVocab.load(tmp_path)
    path = tmp_path / VOCAB_FILE
    path.write_text("{not json")
    with pytest.raises(VocabError, match=VOCAB_FILE):
        WordVocab.load(tmp_path)
    WordVocab.build(CAPTIONS).save(tmp_path)
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"specials": ["<PAD>", "<EOS>", "<SOS>", "<UNK>"]}))
    with pytest.raises(VocabError, match="specials"):
        WordVocab.load(tmp_path)
    path.write_text(json.dumps(record | {"words": ["lesion", "lesion"]}))
    with pytest.raises(VocabError, match="duplicated"):
        WordVocab.load(tmp_path)
    path.write_text(json.dumps(record | {"format_version": 99}))
    with pytest.raises(VocabError, match="newer"):
        WordVocab.load(tmp_path)


def test_validation_names_the_problem() -> None:
    with pytest.raises(VocabError, match="min_count"):
        WordVocab.build(CAPTIONS, min_count=0)
    with pytest.raises(VocabError, match="no word occurs"):
        WordVocab.build(CAPTIONS, min_count=100)
    with pytest.raises(VocabError, match="special"):
        WordVocab(["<EOS>"])
    with pytest.raises(VocabError, match="single non-empty word"):
        WordVocab(["two words"])
    with pytest.raises(VocabError, match="single non-empty word"):
        WordVocab([""])


def test_vocabulary_source_hashes_the_normalised_captions() -> None:
    entry = vocabulary_source(CAPTIONS, 2)
    assert entry["part"] == "word vocabulary" and "3 captions" in entry["source"] and "2 times" in entry["source"]
    assert entry["sha256"] == vocabulary_source([c.upper() for c in CAPTIONS], 2)["sha256"]
    assert entry["sha256"] != vocabulary_source(CAPTIONS[:2], 2)["sha256"]
