"""Tiny component configurations: tests, the synthetic benchmark and the demo model run on CPU.

The shapes follow the real parts (EVA ViT, SAM ViT with a neck, BERT-like Q-Former, OPT), only
smaller; everything else (code paths, checkpoints, loading) is what production uses.
"""

from __future__ import annotations

from typing import Any

from models.msmedcap.config import MedCapConfig


def tiny_config(
    model_type: str = "msmedcap",
    *,
    lm_vocab: int,
    qformer_vocab: int,
    sam_layout: str = "channel",
    width: int = 32,
    image_size: int = 64,
    sam_image_size: int = 64,
    num_query_tokens: int = 4,
    layers: int = 2,
    **overrides: Any,
) -> MedCapConfig:
    heads = max(1, width // 16)
    clip = dict(
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=8,
        initializer_range=0.02,
    )
    # (The BLIP-2 and SAM vision defaults, 1e-10, expect pretrained weights; from scratch they
    # would make constant encoders.)
    sam = dict(
        hidden_size=width,
        output_channels=width // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=sam_image_size,
        patch_size=8,
        window_size=2,
        global_attn_indexes=[layers - 1],
        num_pos_feats=width // 4,
        mlp_dim=width * 2,
        initializer_range=0.02,
    )
    qformer = dict(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=width * 2,
        cross_attention_frequency=1,
        vocab_size=qformer_vocab,
        max_position_embeddings=128,
    )
    lm = dict(
        vocab_size=lm_vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        ffn_dim=width * 2,
        num_attention_heads=heads,
        max_position_embeddings=256,
        word_embed_proj_dim=width,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    config = MedCapConfig(
        model_type="msmedcap",
        clip_vision=clip,
        sam_vision=sam,
        qformer=qformer,
        lm=lm,
        num_query_tokens=num_query_tokens,
        sam_layout=sam_layout,
        clip_image_size=image_size,
        sam_image_size=sam_image_size,
        itc_dim=width,
        max_text_tokens=48,
        **overrides,
    )
    return config.with_model_type(model_type)
