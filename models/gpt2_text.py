"""GPT-2 text for ClipCap and SBG, and the CLIP tokenizer SBG scores text with.

Checkpoint layout: ``gpt2_tokenizer/`` (and for SBG ``clip_tokenizer/``) beside the weights.
GPT-2 has a single special token, ``<|endoftext|>``: it ends every caption and pads batches
(its label is -100 on padding, so only the one real end token is learned).

The small builders train tokenizers offline on a caption corpus for tests, the synthetic
benchmark and the demo; they keep the real tokenizers' conventions (byte-level BPE with GPT-2's
special token; CLIP's lowercase, ``</w>`` word ends, start/end tokens, padding with the end token).
Also here: what ClipCap and SBG share besides text (loading GPT-2 for compose, tiny part configs).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from models.captions import pre_caption

GPT2_FOLDER = "gpt2_tokenizer"
CLIP_FOLDER = "clip_tokenizer"
EOS = "<|endoftext|>"
CLIP_BOS = "<|startoftext|>"
IGNORE = -100


def load_tokenizer(directory: Path, folder: str) -> PreTrainedTokenizerBase:
    """A tokenizer saved under ``directory/folder``; a missing folder is named in the error."""
    path = Path(directory) / folder
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: the checkpoint has no {folder}/")
    return AutoTokenizer.from_pretrained(path)


@dataclass
class Gpt2Text:
    """GPT-2's tokenizer and the caption batches built with it."""

    tokenizer: PreTrainedTokenizerBase

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token is None:
            raise ValueError("tokenizer: GPT-2 tokenizer has no eos token")
        if self.tokenizer.pad_token is None:  # hub GPT-2 has none; padding is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(Path(directory) / GPT2_FOLDER)

    @classmethod
    def load(cls, directory: Path) -> Gpt2Text:
        return cls(load_tokenizer(directory, GPT2_FOLDER))

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def caption_ids(self, caption: str, max_tokens: int, lead: str = "") -> list[int]:
        """``pre_caption(caption)`` + eos, at most ``max_tokens`` (eos kept, so a long caption still ends)."""
        ids = self.ids(lead + pre_caption(caption))[: max(max_tokens - 1, 0)]
        return ids + [self.eos_id]

    def caption_batch(self, captions: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        """Right-padded caption ids with eos; labels are the ids, -100 on padding."""
        return self.prompted_batch([[] for _ in captions], captions, max_tokens)

    def prompted_batch(self, prompts: Sequence[Sequence[int]], captions: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        """``prompt + " " caption + eos`` per row, right-padded; labels -100 on the prompt and padding.

        Prompt and caption are tokenised apart, as the prompt is at inference, so a BPE merge across
        the boundary can neither shift the label mask nor change the prompt. ``max_tokens`` bounds
        the caption part only.
        """
        if len(prompts) != len(captions):
            raise ValueError(f"{len(prompts)} prompts for {len(captions)} captions")
        rows = [(list(p), self.caption_ids(c, max_tokens, " " if p else "")) for p, c in zip(prompts, captions, strict=True)]
        width = max(len(p) + len(c) for p, c in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (prompt, caption) in enumerate(rows):
            n, m = len(prompt), len(caption)
            input_ids[i, : n + m] = torch.tensor(prompt + caption, dtype=torch.long)
            attention_mask[i, : n + m] = 1
            labels[i, n : n + m] = torch.tensor(caption, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def prompt_batch(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts for generation (``generate`` derives positions from the mask)."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            if prompt:
                input_ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
                attention_mask[i, width - len(prompt) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text up to the first eos, stripped."""
        tokens = [int(t) for t in ids]
        if self.eos_id in tokens:
            tokens = tokens[: tokens.index(self.eos_id)]
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in ids]


def generation_kwargs(text: Gpt2Text, preset: Any, num_beams: int | None = None) -> dict[str, Any]:
    """``generate`` arguments of a preset: greedy at one beam, beam search otherwise, never sampling."""
    return dict(
        do_sample=False,
        num_beams=num_beams or preset.num_beams,
        max_new_tokens=preset.max_new_tokens,
        min_new_tokens=preset.min_new_tokens,
        repetition_penalty=preset.repetition_penalty,
        length_penalty=preset.length_penalty,
        eos_token_id=text.eos_id,
        pad_token_id=text.pad_id,
    )


def build_small_gpt2_tokenizer(corpus: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE in GPT-2's layout (``<|endoftext|>`` = 0 is bos, eos, unk and pad) trained on ``corpus``."""
    texts = [pre_caption(t) for t in corpus]
    # Captions follow a prompt after a space in SBG; train on both forms so both merge alike.
    texts += [" " + t for t in texts]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def build_small_clip_tokenizer(corpus: Iterable[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A CLIP-style BPE: lowercase, ``</w>`` word ends, ``<|startoftext|> text <|endoftext|>``, padded with eos.

    Ids: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1. The CLIP text config must name 1 as its
    ``eos_token_id`` (see :func:`check_clip_eos`): the text tower pools at the first eos.
    """
    texts = [pre_caption(t) for t in corpus]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    words = [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    bpe.pre_tokenizer = pre_tokenizers.Sequence(words)
    bpe.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.BPEDecoder(suffix="</w>")])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[CLIP_BOS, EOS],
        end_of_word_suffix="</w>",
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    # The trainer numbers the word-final alphabet in hash order, differently in each process:
    # renumber (specials, then the alphabet sorted, then merges in rank order) so ids are reproducible.
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    merged = ["".join(m) for m in merges]
    alphabet = sorted(set(state["vocab"]) - {CLIP_BOS, EOS} - set(merged))
    vocab = {token: i for i, token in enumerate(dict.fromkeys([CLIP_BOS, EOS, *alphabet, *merged]))}
    bpe.model = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>")
    bos, eos = bpe.token_to_id(CLIP_BOS), bpe.token_to_id(EOS)
    bpe.post_processor = processors.TemplateProcessing(single=f"{CLIP_BOS} $A {EOS}", special_tokens=[(CLIP_BOS, bos), (EOS, eos)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=CLIP_BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def check_clip_eos(text_config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> None:
    """CLIP's text tower pools where its config says the eos is: make sure that is the tokenizer's eos.

    ``eos_token_id == 2`` is transformers' legacy mode (OpenAI configs): it pools at the largest
    id, which is right only when eos is the last id of the vocabulary, as in OpenAI's tokenizer.
    """
    from models.config import ConfigError

    eos = tokenizer.eos_token_id
    configured = text_config.get("eos_token_id", 2)
    if configured == 2:
        vocab = text_config.get("vocab_size")
        last = (int(vocab) if vocab is not None else len(tokenizer)) - 1
        if eos not in (last, 2):
            raise ConfigError(f"clip_text.eos_token_id: legacy value 2 needs eos to be the last id, the tokenizer's eos is {eos}")
    elif configured != eos:
        raise ConfigError(f"clip_text.eos_token_id: {configured} is not the CLIP tokenizer's eos id {eos}")


@dataclass
class ClipTokens:
    """The CLIP tokenizer, padding to the longest text and truncating to the tower's positions."""

    tokenizer: PreTrainedTokenizerBase
    max_tokens: int = 77

    def __call__(self, texts: Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [pre_caption(t) for t in texts], padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}


# -- parts shared by ClipCap and SBG -------------------------------------------------------------


KEPT_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")


def config_kwargs(hf_config: Any, keep: Sequence[str] = KEPT_TOKEN_KEYS) -> dict[str, Any]:
    """A transformers config as the constructor arguments a MedCap config stores (no generic bookkeeping)."""
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict()) | {"transformers_version", "architectures", "torch_dtype", "use_cache"}
    return {k: v for k, v in hf_config.to_dict().items() if k not in generic or k in keep}


def load_gpt2(source: str, flag: str = "--gpt2") -> tuple[Any, Gpt2Text]:
    """A pretrained ``GPT2LMHeadModel`` (hub id or local directory, every weight present) and its tokenizer."""
    from transformers import GPT2LMHeadModel

    from models.sources import ComposeError, from_pretrained_strict, resolve

    resolved = resolve(str(source), flag)
    model = from_pretrained_strict(GPT2LMHeadModel, resolved, flag, "GPT-2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as exc:
        raise ComposeError(f"{flag} {resolved}: no GPT-2 tokenizer beside the weights ({exc})") from None
    text = Gpt2Text(tokenizer)
    if len(text) > model.config.vocab_size:
        raise ComposeError(f"{flag} {resolved}: the tokenizer has {len(text)} tokens, the model {model.config.vocab_size}")
    return model, text


def tiny_gpt2_config(vocab_size: int, eos_id: int, width: int = 32, layers: int = 2, positions: int = 128) -> dict[str, Any]:
    """GPT-2 shapes, tiny; no dropout, so tiny models memorise a few captions in a few hundred steps."""
    return dict(
        vocab_size=vocab_size,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 16),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def tiny_clip_text_config(tokenizer: PreTrainedTokenizerBase, width: int = 32, layers: int = 2, positions: int = 64) -> dict[str, Any]:
    eos = int(tokenizer.eos_token_id)
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 16),
        max_position_embeddings=positions,
        projection_dim=width,
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=eos,
        pad_token_id=eos,
    )
