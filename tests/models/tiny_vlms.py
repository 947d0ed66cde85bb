"""Tiny randomly initialised image-text-to-text models of two architectures, saved as the hub serves
them (model, processor with a chat template, tokenizer built here): nothing is downloaded.

LLaVA (a CLIP vision tower and a Llama LM) and Gemma 3 (a SigLIP tower and a Gemma 3 LM: the
MedGemma layout) go through ``AutoModelForImageTextToText`` and ``AutoProcessor`` like real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "axial ct of the head no focal lesion",
    "sagittal mr of the brain small hyperintense lesion",
    "describe the imaging findings in one to three short sentences",
    "dicom header ct head axial without contrast key images of one series of a radiology study",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def chat_template(image: str) -> str:
    """A plain chat template: the processor expands ``image`` into the model's image tokens."""
    return (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )


def tokenizer(extra: list[str], **named: str) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS + extra, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_special_tokens=named
    )


def _ids(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": len(tok)}


def _id(tok: PreTrainedTokenizerFast, token: str) -> int:
    value = tok.convert_tokens_to_ids(token)
    assert isinstance(value, int)
    return value


def save_tiny_llava(directory: Path, seed: int = 0) -> Path:
    tok = tokenizer(["<image>"], image_token="<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ).to_dict(),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, **_ids(tok)
        ).to_dict(),
        image_token_index=_id(tok, "<image>"),
        vision_feature_layer=-1,
    )
    return _save(directory, lambda: LlavaForConditionalGeneration(config), processor, seed)


def save_tiny_gemma3(directory: Path, seed: int = 0) -> Path:
    tok = tokenizer(
        ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        chat_template=chat_template("<start_of_image>"),
        image_seq_length=4,
    )
    config = Gemma3Config(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=64,
            **_ids(tok),
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4,
        boi_token_index=_id(tok, "<start_of_image>"),
        eoi_token_index=_id(tok, "<end_of_image>"),
        image_token_index=_id(tok, "<image_soft_token>"),
    )
    return _save(directory, lambda: Gemma3ForConditionalGeneration(config), processor, seed)


def _save(directory: Path, build: Callable[[], torch.nn.Module], processor: object, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build().eval()
    model.save_pretrained(directory)  # type: ignore[operator]
    processor.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


#: architecture -> builder, for parametrised tests
TINY_VLMS = {"llava": save_tiny_llava, "gemma3": save_tiny_gemma3}
