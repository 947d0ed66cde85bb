"""The two frozen image encoders, each turned into a token sequence for its Q-Former."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel, SamVisionConfig, SamVisionModel


class ClipEncoder(nn.Module):
    """BLIP-2's EVA-CLIP ViT; its ``post_layernorm`` is LAVIS' ``ln_vision``."""

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.model = Blip2VisionModel(config)
        self.image_size = config.image_size

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # 364 px evaluation with 224 px weights: interpolate the position embeddings.
        interpolate = pixels.shape[-1] != self.image_size
        return self.model(pixel_values=pixels, interpolate_pos_encoding=interpolate).last_hidden_state


class SamEncoder(nn.Module):
    """SAM's ViT image encoder. Its neck output (B, C, H, W) becomes tokens in one of two layouts.

    ``channel`` (the official MSMedCap code): ``view(B, C, H*W)``, C tokens each carrying one
    channel's whole spatial map; position is implicit in which K/V weight meets which pixel.
    ``spatial``: H*W tokens of C values, plus SAM's own dense positional encoding (random
    Fourier features, the prompt encoder's ``shared_image_embedding``).
    """

    def __init__(self, config: SamVisionConfig, layout: str) -> None:
        super().__init__()
        self.model = SamVisionModel(config)
        self.layout = layout
        grid = _int(config.image_size) // _int(config.patch_size)
        self.grid = grid
        self.channels = int(config.output_channels)
        # Kept as a (frozen) parameter so compose can load SAM's own matrix into it.
        self.positional_gaussian = nn.Parameter(torch.randn(2, self.channels // 2), requires_grad=False)

    @property
    def width(self) -> int:
        return self.grid * self.grid if self.layout == "channel" else self.channels

    def positional_encoding(self) -> torch.Tensor:
        """(H*W, C) sin/cos encoding of the grid cell centres, as ``SamModel.get_image_wide_positional_embeddings``."""
        coords = (torch.arange(self.grid, device=self.positional_gaussian.device, dtype=torch.float32) + 0.5) / self.grid
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        points = torch.stack([x, y], dim=-1).reshape(-1, 2) * 2 - 1
        projected = 2 * math.pi * points @ self.positional_gaussian.float()
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        neck = self.model(pixel_values=pixels).last_hidden_state  # (B, C, H, W)
        batch = neck.shape[0]
        if self.layout == "channel":
            return neck.reshape(batch, self.channels, -1)
        tokens = neck.flatten(2).transpose(1, 2)
        return tokens + self.positional_encoding().to(tokens.dtype)


def _int(value: object) -> int:
    """A size that transformers types as int, list or tuple: SAM's are ints."""
    if not isinstance(value, int):
        raise TypeError(f"expected an int, not {value!r}")
    return value
