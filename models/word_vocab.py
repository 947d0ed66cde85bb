"""A word-level vocabulary: the text codec of the captioners that predict whole words (CNN-LSTM, CLIP-Transformer).

Words are ``pre_caption(text).split()``, so training targets, generated captions and evaluation
references share one normalisation. Ids 0–3 are the specials; the words follow, most frequent
first (ties alphabetical), so the same captions always give the same ids. Saved as ``vocab.json``
in the checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from models.captions import pre_caption
from models.config import ConfigError

PAD, SOS, EOS, UNK = 0, 1, 2, 3
SPECIALS: tuple[str, ...] = ("<PAD>", "<SOS>", "<EOS>", "<UNK>")
VOCAB_FILE = "vocab.json"
FORMAT = "medcap-word-vocab"
FORMAT_VERSION = 1


class VocabError(ValueError):
    """A bad vocabulary or vocabulary file; the message names what is wrong."""


def tokenize(text: str) -> list[str]:
    """The words of a caption as the vocabulary sees them."""
    return pre_caption(text).split()


def check_vocabulary_fields(vocab_size: int, max_caption_tokens: int) -> None:
    """The config fields every word-level decoder shares: room for words, and for <SOS> and <EOS>."""
    if vocab_size <= len(SPECIALS):
        raise ConfigError(f"vocab_size: {vocab_size} leaves no word beside the {len(SPECIALS)} special tokens")
    if max_caption_tokens < 2:
        raise ConfigError(f"max_caption_tokens: must be at least 2 (<SOS> and <EOS>), got {max_caption_tokens}")


def vocabulary_source(captions: Sequence[str], min_count: int) -> dict[str, str]:
    """A provenance entry for a vocabulary built from ``captions`` (sha256 of the normalised captions, in order)."""
    digest = hashlib.sha256("\n".join(pre_caption(c) for c in captions).encode()).hexdigest()
    return {"part": "word vocabulary", "source": f"{len(captions)} captions, words seen at least {min_count} times", "sha256": digest}


class WordVocab:
    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        words = list(words)
        for word in words:
            if not isinstance(word, str) or not word or word != word.strip() or len(word.split()) != 1:
                raise VocabError(f"words: {word!r} is not a single non-empty word")
            if word in SPECIALS:
                raise VocabError(f"words: {word!r} is a special token")
        duplicates = sorted(w for w, n in Counter(words).items() if n > 1)
        if duplicates:
            raise VocabError(f"words: duplicated {duplicates[:5]}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise VocabError(f"min_count: must be an integer of at least 1, got {min_count!r}")
        self.min_count = min_count
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> WordVocab:
        """Every word seen at least ``min_count`` times; rarer words become ``<UNK>``."""
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise VocabError(f"min_count: must be an integer of at least 1, got {min_count!r}")
        counts = Counter(w for caption in captions for w in tokenize(caption))
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w))
        if not words:
            raise VocabError(f"captions: no word occurs at least {min_count} time(s) ({len(counts)} distinct words)")
        return cls(words, min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordVocab) and self.itos == other.itos

    def __hash__(self) -> int:
        return hash(tuple(self.itos))

    @property
    def words(self) -> list[str]:
        return self.itos[len(SPECIALS) :]

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``<SOS> words <EOS>``; a long caption loses its last words, never the ``<EOS>``."""
        ids = [self.stoi.get(w, UNK) for w in tokenize(text)]
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
                raise VocabError(f"max_length: must be an integer of at least 2 (<SOS> and <EOS>), got {max_length!r}")
            ids = ids[: max_length - 2]
        return [SOS, *ids, EOS]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids padded with ``<PAD>`` and (B,) lengths (``<SOS>`` and ``<EOS>`` included)."""
        if len(texts) == 0:
            raise VocabError("texts: empty batch")
        rows = [self.encode(t, max_length) for t in texts]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        ids = torch.full((len(rows), int(lengths.max())), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, lengths

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words up to the first ``<EOS>``, specials left out."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        words = []
        for i in values:
            i = int(i)
            if i == EOS:
                break
            if not 0 <= i < len(self.itos):
                raise VocabError(f"ids: {i} is outside the vocabulary (size {len(self.itos)})")
            if i >= len(SPECIALS):
                words.append(self.itos[i])
        return " ".join(words).strip()

    def decode_batch(self, rows: Iterable[Sequence[int] | torch.Tensor]) -> list[str]:
        return [self.decode(r) for r in rows]

    # -- files ---------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "min_count": self.min_count,
            "specials": list(SPECIALS),
            "words": self.words,
        }
        (directory / VOCAB_FILE).write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> WordVocab:
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} has no word vocabulary")
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VocabError(f"{path}: {exc}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise VocabError(f"{path}: not a {FORMAT} file")
        if int(record.get("format_version", 0)) > FORMAT_VERSION:
            raise VocabError(f"{path}: format_version {record['format_version']} is newer than this MedCap understands ({FORMAT_VERSION})")
        if record.get("specials") != list(SPECIALS):
            raise VocabError(f"{path}: specials {record.get('specials')!r} are not {list(SPECIALS)}")
        words = record.get("words")
        if not isinstance(words, list):
            raise VocabError(f"{path}: words must be a list")
        try:
            return cls(words, int(record.get("min_count", 1)))
        except VocabError as exc:
            raise VocabError(f"{path}: {exc}") from None
