"""Shared test parts: tiny pretrained-format parts saved locally, as the hub would serve them, for
compose tests; synthetic training slices, a plain training loop and generation presets for the
captioner tests."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2Model,
    OPTConfig,
    SamConfig,
    SamModel,
    SamVisionConfig,
)

from dicom_io.image_views import ImageView, view_array
from dicom_io.transforms import clip_input
from models.captions import pre_caption
from models.clip_parts import tiny_clip_vision_config
from models.cnn_lstm import calibrate_batchnorm, tiny_mobilenet_config
from models.generation import GenerationPreset
from models.gpt2_text import build_small_clip_tokenizer, build_small_gpt2_tokenizer, tiny_clip_text_config, tiny_gpt2_config
from models.msmedcap.compose import SAM_PE_KEY_PTH, SAM_RENAMES
from models.msmedcap.tokenizers import Tokenizers, build_small_tokenizers
from models.synthetic import SliceAttributes, caption_for, render_slice

CAPTIONS = [
    "axial ct of the head. small hyperdense lesion in the left hemisphere.",
    "coronal mr of the chest. no focal lesion.",
    "sagittal ct of the abdomen. large hypodense lesion on the right.",
]


def tiny_tokenizers() -> Tokenizers:
    return build_small_tokenizers(CAPTIONS * 5, lm_vocab=300, qformer_vocab=200)


def save_tiny_blip2(directory: Path, tokenizers: Tokenizers, width: int = 32) -> Path:
    vision = Blip2VisionConfig(
        hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    qformer = Blip2QFormerConfig(
        hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, cross_attention_frequency=1
    )
    text = OPTConfig(
        vocab_size=len(tokenizers.lm),
        hidden_size=width,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=width,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(1)
    model = Blip2ForConditionalGeneration(
        Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(), num_query_tokens=4)
    )
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)  # as a trained checkpoint would have them
    model.save_pretrained(directory)
    tokenizers.lm.save_pretrained(directory)
    return directory


def save_tiny_bert(directory: Path, width: int = 32) -> Path:
    """A tiny BERT laid out as bert-base-uncased is on the hub: BertForPreTraining weights and a
    WordPiece tokenizer without [DEC], shaped like the tiny BLIP-2's Q-Former."""
    from transformers import BertConfig, BertForPreTraining

    tokenizer = build_small_tokenizers(CAPTIONS * 5, lm_vocab=300, qformer_vocab=200, dec_token=False).qformer
    torch.manual_seed(5)
    model = BertForPreTraining(
        BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_blip2_itm(directory: Path, vocab_size: int, width: int = 32) -> Path:
    """A tiny Blip2ForImageTextRetrieval (BLIP-2's stage 1, as Salesforce/blip2-itm-vit-g), with the text side."""
    from transformers import Blip2ForImageTextRetrieval

    vision = Blip2VisionConfig(
        hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    qformer = Blip2QFormerConfig(
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        cross_attention_frequency=1,
        use_qformer_text_input=True,
        vocab_size=vocab_size,
    )
    torch.manual_seed(6)
    Blip2ForImageTextRetrieval(
        Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=4, image_text_hidden_size=width)
    ).save_pretrained(directory)
    return directory


def tiny_sam_model(width: int = 32) -> SamModel:
    vision = SamVisionConfig(
        hidden_size=width,
        output_channels=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        window_size=2,
        global_attn_indexes=[1],
        num_pos_feats=8,
        mlp_dim=64,
    )
    torch.manual_seed(2)
    return SamModel(SamConfig(vision_config=vision.to_dict()))


def save_tiny_sam_hf(directory: Path) -> Path:
    tiny_sam_model().save_pretrained(directory)
    return directory


def save_tiny_sam_pth(path: Path) -> tuple[Path, SamModel]:
    """The same kind of tiny SAM, saved under the original segment-anything key names."""
    model = tiny_sam_model()
    state = {}
    for key, value in model.vision_encoder.state_dict().items():
        key = "vision_encoder." + key
        for old, new in reversed(SAM_RENAMES):
            key = key.replace(new, old)
        state[key] = value.clone()
    state[SAM_PE_KEY_PTH] = model.shared_image_embedding.positional_embedding.detach().clone()
    state["mask_decoder.some.weight"] = torch.zeros(1)  # other parts of the file are ignored
    torch.save(state, path)
    return path, model


# -- synthetic training slices for the captioner tests -------------------------------------------

#: Five slices with distinct captions (the GPT-2 captioners: ClipCap, SBG).
ATTRIBUTES = [
    SliceAttributes("ct", "head", "axial", True, "left", "small", "hyperdense"),
    SliceAttributes("mr", "chest", "coronal", False),
    SliceAttributes("ct", "abdomen", "sagittal", True, "anterior", "large", "hypodense"),
    SliceAttributes("mr", "head", "axial", True, "right", "large", "hyperintense"),
    SliceAttributes("ct", "chest", "axial", False),
]
#: Six slices with distinct captions (the word-vocabulary captioners: CNN-LSTM, CLIP-Transformer).
WORD_ATTRIBUTES = [
    SliceAttributes("ct", "head", "axial", False),
    SliceAttributes("mr", "chest", "coronal", True, "left", "large", "hyperintense"),
    SliceAttributes("ct", "abdomen", "sagittal", True, "anterior", "small", "hypodense"),
    SliceAttributes("mr", "head", "sagittal", False),
    SliceAttributes("ct", "chest", "axial", True, "right", "large", "hyperdense"),
    SliceAttributes("mr", "abdomen", "axial", False),
]
FIT_KEYS = {"epochs", "batch_size", "lr", "optimizer", "weight_decay", "grad_clip", "patience", "warmup_steps"}


def training_captions(attributes: Sequence[SliceAttributes] = ATTRIBUTES) -> list[str]:
    return [caption_for(a) for a in attributes]


def slice_images(attributes: Sequence[SliceAttributes] = ATTRIBUTES) -> list[np.ndarray]:
    """The slices rendered at 64 x 64, one seed per slice."""
    return [render_slice(a, size=64, seed=i).image for i, a in enumerate(attributes)]


def training_set(
    attributes: Sequence[SliceAttributes] = ATTRIBUTES, size: int = 64, view: ImageView | None = None
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The slices' captions, and the slices as the CLIP view at ``size``: {"clip": (N, 3, size, size)}
    (or as ``view``, under its name)."""
    if view is not None:
        images = [view_array(view, image)[0] for image in slice_images(attributes)]
        return training_captions(attributes), {view.name: torch.from_numpy(np.stack(images))}
    images = [clip_input(image, size) for image in slice_images(attributes)]
    return training_captions(attributes), {"clip": torch.from_numpy(np.stack(images))}


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared CPU: thread hand-offs cost far more than they save (10x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(
    model: torch.nn.Module, text: object, features: dict[str, torch.Tensor], captions: Sequence[str], *, steps: int, lr: float
) -> list[float]:
    """A plain Adam loop (seed 0, one thread) on ``trainable_parameters`` over ``caption_loss``; every step's loss.
    Leaves the model in eval mode."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr)  # type: ignore[operator]
    model.train()
    losses = []
    with one_thread():
        for _ in range(steps):
            loss = model.caption_loss(features, captions, text)  # type: ignore[operator]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def reproduced(generated: Sequence[str], captions: Sequence[str]) -> list[bool]:
    """Per caption: did generation give it back (after the usual normalisation)?"""
    return [pre_caption(g) == pre_caption(c) for g, c in zip(generated, captions, strict=True)]


# -- generation presets ---------------------------------------------------------------------------


def presets(max_new_tokens: int) -> tuple[GenerationPreset, GenerationPreset]:
    """Greedy search and 3-beam search, no penalties: (greedy, beam)."""
    greedy = GenerationPreset(
        "greedy", num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=1, repetition_penalty=1.0, length_penalty=1.0
    )
    return greedy, replace(greedy, name="beam", num_beams=3)


#: For the GPT-2 captioners (subword tokens: room for 40).
GREEDY, BEAM = presets(40)


# -- tiny CLIP and GPT-2 as the hub serves them ---------------------------------------------------


def save_tiny_clip(directory: Path, captions: Sequence[str], width: int = 32, image_size: int = 64) -> CLIPModel:
    """A tiny ``CLIPModel`` and its tokenizer saved as the hub serves them (one folder)."""
    tokenizer = build_small_clip_tokenizer(captions)
    text = tiny_clip_text_config(tokenizer, width)
    vision = tiny_clip_vision_config(image_size, width)
    config = CLIPConfig(
        text_config={k: v for k, v in text.items() if k != "projection_dim"},
        vision_config={k: v for k, v in vision.items() if k != "projection_dim"},
        projection_dim=width,
    )
    torch.manual_seed(3)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(4.0)  # not the initial value: compose must copy it
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def save_tiny_gpt2(directory: Path, captions: Sequence[str], width: int = 32) -> GPT2LMHeadModel:
    """A tiny GPT-2 and its tokenizer saved as the hub serves them (one folder)."""
    tokenizer = build_small_gpt2_tokenizer(captions)
    torch.manual_seed(4)
    model = GPT2LMHeadModel(GPT2Config(**tiny_gpt2_config(len(tokenizer), tokenizer.eos_token_id, width)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def save_tiny_mobilenet(directory: Path, preprocessor: dict[str, object] | None, classifier: bool = True) -> MobileNetV2Model:
    """A tiny checkpoint: a classifier laid out as google/mobilenet_v2_1.0_224 is on the hub, or a bare MobileNetV2Model."""
    torch.manual_seed(3)
    config = MobileNetV2Config(**tiny_mobilenet_config(48), num_labels=5)  # type: ignore[call-arg]  # a PretrainedConfig kwarg
    source = MobileNetV2ForImageClassification(config) if classifier else MobileNetV2Model(config)
    backbone: Any = source.mobilenet_v2 if classifier else source
    calibrate_batchnorm(backbone, torch.randn(4, 3, 48, 48))  # non-default running statistics to carry over
    source.save_pretrained(directory)
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return backbone
