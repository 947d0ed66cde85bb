"""The CLIP towers that ClipCap, SBG and the CLIP-feature transformer read.

transformers' ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection`` hold exactly
the ``vision_model.*`` + ``visual_projection`` (``text_model.*`` + ``text_projection``) keys of a
full ``CLIPModel`` checkpoint, so ``from_pretrained("openai/clip-vit-large-patch14")`` or a local
copy loads either tower with nothing left random; :func:`load_tower` checks that it did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

from models.frozen import freeze


class ClipImageEncoder(nn.Module):
    """Frozen CLIP ViT: the projected image embedding (ClipCap, SBG) and the patch tokens (CLIP-ViL)."""

    def __init__(self, vision: dict[str, Any]) -> None:
        super().__init__()
        self.model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        config: Any = self.model.config
        self.image_size = int(config.image_size)
        freeze(self)

    @property
    def embedding_dim(self) -> int:
        config: Any = self.model.config
        return int(config.projection_dim)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        param = next(self.model.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=pixels.shape[-1] != self.image_size)
        return {"embedding": out.image_embeds, "patches": out.last_hidden_state}


class ClipTextEncoder(nn.Module):
    """CLIP's text tower with its projection (SBG scores keywords and reranks captions with it)."""

    def __init__(self, text: dict[str, Any]) -> None:
        super().__init__()
        self.model = CLIPTextModelWithProjection(CLIPTextConfig(**text))

    @property
    def embedding_dim(self) -> int:
        config: Any = self.model.config
        return int(config.projection_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds


def load_clip(source: str | Path, flag: str = "--clip") -> Any:
    """A pretrained ``CLIPModel`` (hub id or local directory), every weight present or an error."""
    from transformers import CLIPModel

    from models.sources import from_pretrained_strict, resolve

    return from_pretrained_strict(CLIPModel, resolve(str(source), flag), flag, "CLIP")


def tower_from(clip: Any, tower: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config arguments and weights of one tower (``vision`` or ``text``) of a ``CLIPModel``.

    Build the MedCap part from the arguments, then ``part.model.load_state_dict(weights)``
    (strict, so nothing is left at random).
    """
    if tower not in ("vision", "text"):
        raise ValueError(f"tower: {tower!r} is not vision or text")
    sub = getattr(clip.config, f"{tower}_config")
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict()) | {
        "transformers_version",
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "_name_or_path",
    }
    keep = {"pad_token_id", "bos_token_id", "eos_token_id"} if tower == "text" else set()
    config = {k: v for k, v in sub.to_dict().items() if k not in generic or k in keep} | {"projection_dim": int(clip.config.projection_dim)}
    prefix, projection = ("vision_model.", "visual_projection.") if tower == "vision" else ("text_model.", "text_projection.")
    weights = {k: v for k, v in clip.state_dict().items() if k.startswith((prefix, projection))}
    return config, weights


def tiny_clip_vision_config(image_size: int = 64, width: int = 32, layers: int = 2) -> dict[str, Any]:
    """A tiny CLIP ViT (an 8 x 8 grid of patches) for tests and the synthetic benchmark."""
    return dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 16),
        image_size=image_size,
        patch_size=max(1, image_size // 8),
        projection_dim=width,
    )
