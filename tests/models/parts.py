"""Tiny pretrained-format parts saved locally, as the hub would serve them, for compose tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
    SamConfig,
    SamModel,
    SamVisionConfig,
)

from models.compose import _SAM_RENAMES, SAM_PE_KEY_PTH
from models.tokenizers import Tokenizers, build_small_tokenizers

CAPTIONS = [
    "axial ct of the head. small hyperdense lesion in the left hemisphere.",
    "coronal mr of the chest. no focal lesion.",
    "sagittal ct of the abdomen. large hypodense lesion on the right.",
]


def tiny_tokenizers() -> Tokenizers:
    return build_small_tokenizers(CAPTIONS * 5, lm_vocab=300, qformer_vocab=200)


def save_tiny_blip2(directory: Path, tokenizers: Tokenizers, width: int = 32) -> Path:
    vision = Blip2VisionConfig(hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, cross_attention_frequency=1)
    text = OPTConfig(vocab_size=len(tokenizers.lm), hidden_size=width, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                     max_position_embeddings=128, word_embed_proj_dim=width, bos_token_id=2, eos_token_id=2, pad_token_id=1)  # fmt: skip
    torch.manual_seed(1)
    model = Blip2ForConditionalGeneration(Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                                      text_config=text.to_dict(), num_query_tokens=4))  # fmt: skip
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)  # as a trained checkpoint would have them
    model.save_pretrained(directory)
    tokenizers.lm.save_pretrained(directory)
    return directory


def tiny_sam_model(width: int = 32) -> SamModel:
    vision = SamVisionConfig(hidden_size=width, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                             patch_size=8, window_size=2, global_attn_indexes=[1], num_pos_feats=8, mlp_dim=64)  # fmt: skip
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
        for old, new in reversed(_SAM_RENAMES):
            key = key.replace(new, old)
        state[key] = value.clone()
    state[SAM_PE_KEY_PTH] = model.shared_image_embedding.positional_embedding.detach().clone()
    state["mask_decoder.some.weight"] = torch.zeros(1)  # other parts of the file are ignored
    torch.save(state, path)
    return path, model
