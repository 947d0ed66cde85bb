"""The two tokenizers of a captioner: the LM's (OPT BPE) and the Q-Former's (BERT WordPiece + [DEC]).

Also builds small ones from a caption corpus, offline, for tests, the synthetic benchmark and
the demo model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from models.captions import pre_caption

QFORMER_BOS = "[DEC]"


@dataclass
class Tokenizers:
    lm: PreTrainedTokenizerBase
    qformer: PreTrainedTokenizerBase

    def save(self, directory: Path) -> None:
        self.lm.save_pretrained(directory / "lm_tokenizer")
        self.qformer.save_pretrained(directory / "qformer_tokenizer")

    @classmethod
    def load(cls, directory: Path) -> Tokenizers:
        for sub in ("lm_tokenizer", "qformer_tokenizer"):
            if not (directory / sub).is_dir():
                raise FileNotFoundError(f"{directory / sub} is missing: not a MedCap checkpoint")
        return cls(
            AutoTokenizer.from_pretrained(directory / "lm_tokenizer"), AutoTokenizer.from_pretrained(directory / "qformer_tokenizer")
        )

    def eos_id(self, eos_text: str) -> int:
        ids = self.lm(eos_text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"eos_text {eos_text!r} is not a single LM token ({ids})")
        return int(ids[0])

    def lm_batch(self, captions: list[str], prompt: str, eos_text: str, max_tokens: int) -> dict[str, torch.Tensor]:
        """``BOS + prompt + caption + eos``, labels -100 on BOS, prompt and padding (LAVIS blip2_opt).

        Prompt and caption are tokenised apart, exactly as the prompt is at inference, so a BPE
        merge across the boundary can neither shift the label mask nor change the prompt. A caption
        longer than ``max_tokens`` loses its last words, never its end token: a model that never
        sees the end of a long caption never learns to stop.
        """
        head = self.prompt_ids(prompt)
        eos = self.eos_id(eos_text)
        room = max_tokens - len(head) - 1
        if room < 1:
            raise ValueError(f"max_text_tokens: {max_tokens} leaves no room for a caption after the prompt's {len(head)} tokens")
        sep = " " if prompt else ""
        rows = [head + self.lm(sep + pre_caption(c), add_special_tokens=False).input_ids[:room] + [eos] for c in captions]
        width = max(len(row) for row in rows)
        pad = int(self.lm.pad_token_id)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : len(head)] = -100
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def prompt_ids(self, prompt: str) -> list[int]:
        """BOS followed by the prompt's tokens."""
        return [int(self.lm.bos_token_id)] + (self.lm(prompt, add_special_tokens=False).input_ids if prompt else [])

    def prompt_batch(self, prompt: str, batch: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([self.prompt_ids(prompt)] * batch, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def qformer_batch(self, captions: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        enc = self.qformer(
            [pre_caption(c) for c in captions], padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    @property
    def qformer_bos_id(self) -> int:
        token_id: Any = self.qformer.convert_tokens_to_ids(QFORMER_BOS)  # one token: one id
        return int(token_id)


def build_small_tokenizers(corpus: Iterable[str], lm_vocab: int = 512, qformer_vocab: int = 512, dec_token: bool = True) -> Tokenizers:
    """Train a byte-level BPE (OPT layout: <s>=0, <pad>=1, </s>=2, <unk>=3) and a WordPiece
    with [DEC] on the given captions. Seconds on CPU, no downloads. ``dec_token=False``: a
    WordPiece without [DEC], as bert-base-uncased ships (compose appends it)."""
    texts = [pre_caption(t) for t in corpus] + ["\n"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=lm_vocab,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # OPT prepends </s> as BOS.
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    lm = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ([QFORMER_BOS] if dec_token else [])
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=qformer_vocab, special_tokens=specials, show_progress=False))
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", wp.token_to_id("[CLS]")), ("[SEP]", wp.token_to_id("[SEP]"))]
    )
    qformer = PreTrainedTokenizerFast(
        tokenizer_object=wp,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **({"bos_token": QFORMER_BOS} if dec_token else {}),
    )
    return Tokenizers(lm, qformer)
