"""ClipCap (Mokady et al. 2021): a mapping network turns the CLIP image embedding into a GPT-2 prefix.

As in Huynh et al., "CLIP-Prefix for Image Captioning and an Experiment on Blind Image Guessing"
(ViT-L/14 CLIP, gradient clipping). Two mappers, as in the ClipCap code:

* ``mlp``: Linear(clip, gpt*L/2) -> Tanh -> Linear(gpt*L), L = 10 prefix tokens; GPT-2 fine-tuned.
* ``transformer``: Linear(clip, clip_length*gpt) gives ``clip_length`` tokens, learned prefix
  constants are appended, 8 pre-norm transformer layers run over both and the constants' outputs
  are the prefix (L = clip_length = 40); GPT-2 frozen.

CLIP is frozen throughout. The loss is GPT-2's cross-entropy on the caption tokens and eos only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from models.clip_parts import ClipImageEncoder, tiny_clip_vision_config
from models.config import ClipViewConfig, ConfigError
from models.families import ComposeRequest, Family
from models.frozen import freeze
from models.generation import GenerationPreset
from models.gpt2_text import (
    IGNORE,
    Gpt2Text,
    build_small_gpt2_tokenizer,
    config_kwargs,
    generation_kwargs,
    load_gpt2,
    tiny_gpt2_config,
)

FORMAT_VERSION = 1
MAPPERS = ("mlp", "transformer")
#: The ClipCap code's settings per mapper, used where the config leaves them out.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"prefix_length": 10, "clip_length": 10, "freeze_lm": False},
    "transformer": {"prefix_length": 40, "clip_length": 40, "freeze_lm": True},
}


@dataclass
class ClipCapConfig(ClipViewConfig):
    #: ``transformers.CLIPVisionConfig`` arguments, ``projection_dim`` included.
    clip_vision: dict[str, Any]
    #: ``transformers.GPT2Config`` arguments.
    gpt2: dict[str, Any]
    mapper: str = "mlp"
    #: GPT-2 tokens the image becomes; None: the paper's value for the mapper.
    prefix_length: int | None = None
    #: Transformer mapper: tokens the CLIP embedding is first projected to.
    clip_length: int | None = None
    mapper_layers: int = 8
    mapper_heads: int = 8
    #: GPT-2 frozen (only the mapper trains) or fine-tuned with it; None: the paper's choice for the mapper.
    freeze_lm: bool | None = None
    #: Unit-normalise the CLIP embedding first (the ClipCap code's ``--normalize_prefix``).
    normalize_prefix: bool = False
    max_caption_tokens: int = 64
    model_type: str = "clipcap"
    version: str = "0.1.0"
    name: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.require_model_type("clipcap")
        if self.mapper not in MAPPERS:
            raise ConfigError(f"mapper: {self.mapper!r} is not one of {MAPPERS}")
        self.require_arguments("clip_vision")
        self.require_arguments("gpt2")
        for name, value in PAPER_DEFAULTS[self.mapper].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not isinstance(self.freeze_lm, bool):
            raise ConfigError(f"freeze_lm: must be true or false, got {self.freeze_lm!r}")
        if not isinstance(self.normalize_prefix, bool):
            raise ConfigError(f"normalize_prefix: must be true or false, got {self.normalize_prefix!r}")
        self.require_positive("prefix_length", "clip_length", "mapper_layers", "mapper_heads", "max_caption_tokens")
        if self.mapper == "transformer" and self.lm_width % self.mapper_heads:
            raise ConfigError(f"mapper_heads: {self.mapper_heads} does not divide the GPT-2 width {self.lm_width}")
        positions = int(GPT2Config(**self.gpt2).n_positions)
        if self.prefix_length + self.max_caption_tokens > positions:  # type: ignore[operator]
            total = f"prefix ({self.prefix_length}) + caption ({self.max_caption_tokens})"
            raise ConfigError(f"max_caption_tokens: {total} exceed GPT-2's {positions} positions")
        self.require_format(FORMAT_VERSION)

    @property
    def lm_width(self) -> int:
        return int(GPT2Config(**self.gpt2).n_embd)

    @property
    def clip_dim(self) -> int:
        return int(self.clip_vision.get("projection_dim", 512))

    @property
    def display_name(self) -> str:
        return self.name or f"ClipCap ({'MLP' if self.mapper == 'mlp' else 'Transformer'})"

    def summary(self) -> list[str]:
        layers = f", {self.mapper_layers} layers, {self.clip_length} CLIP tokens" if self.mapper == "transformer" else ""
        return [
            f"- model type: `clipcap` ({self.display_name}), version {self.version}",
            f"- mapper: {self.mapper}{layers}; prefix of {self.prefix_length} GPT-2 tokens"
            + ("; CLIP embedding unit-normalised" if self.normalize_prefix else ""),
            f"- CLIP ViT frozen; GPT-2 {'frozen' if self.freeze_lm else 'fine-tuned'}",
        ]


class MlpMapper(nn.Module):
    """ClipCap's ``MLP``: one hidden Tanh layer of half the prefix's size."""

    def __init__(self, clip_dim: int, width: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length = prefix_length
        hidden = width * prefix_length // 2
        self.net = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, width * prefix_length))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding).view(embedding.shape[0], self.prefix_length, -1)


class TransformerMapper(nn.Module):
    """ClipCap's ``TransformerMapper``: pre-norm layers, ReLU feed-forward of twice the width, no dropout.

    (ClipCap's attention has no q/k/v biases; torch's layer has them. Nothing else differs.)
    """

    def __init__(self, clip_dim: int, width: int, prefix_length: int, clip_length: int, layers: int, heads: int) -> None:
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(clip_dim, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, activation="relu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(embedding).view(embedding.shape[0], self.clip_length, -1)
        constants = self.prefix_const.unsqueeze(0).expand(embedding.shape[0], -1, -1)
        return self.transformer(torch.cat([tokens, constants], dim=1))[:, self.clip_length :]


class ClipCapModel(nn.Module):
    def __init__(self, config: ClipCapConfig) -> None:
        super().__init__()
        self.config = config
        self.clip = ClipImageEncoder(config.clip_vision)  # frozen by construction
        self.lm: Any = GPT2LMHeadModel(GPT2Config(**config.gpt2))  # Any: transformers types generate() for another self
        prefix, clip_length, width = int(config.prefix_length), int(config.clip_length), config.lm_width  # type: ignore[arg-type]
        self.mapper: nn.Module
        if config.mapper == "mlp":
            self.mapper = MlpMapper(config.clip_dim, width, prefix)
        else:
            self.mapper = TransformerMapper(config.clip_dim, width, prefix, clip_length, config.mapper_layers, config.mapper_heads)
        if config.freeze_lm:
            freeze(self.lm)

    @torch.no_grad()
    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "clip" not in pixels:
            raise ValueError(f"pixels: {self.config.display_name} reads the clip view, got {sorted(pixels)}")
        # fp32 whatever the tower's dtype: features are cached for training and the mapper is fp32.
        return {"embedding": self.clip(pixels["clip"])["embedding"].float()}

    def prefix(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, prefix_length, GPT-2 width) in GPT-2's dtype."""
        first = next(self.mapper.parameters())
        embedding = features["embedding"].to(device=first.device, dtype=first.dtype)
        if self.config.normalize_prefix:
            embedding = F.normalize(embedding, dim=-1)
        return self.mapper(embedding).to(self.lm.get_input_embeddings().weight.dtype)

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: Gpt2Text) -> torch.Tensor:
        prefix = self.prefix(features)
        device = prefix.device
        batch = {k: v.to(device) for k, v in text.caption_batch(captions, self.config.max_caption_tokens).items()}
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(batch["input_ids"])], dim=1)
        shape = prefix.shape[:2]
        mask = torch.cat([torch.ones(shape, dtype=torch.long, device=device), batch["attention_mask"]], dim=1)
        labels = torch.cat([torch.full(shape, IGNORE, dtype=torch.long, device=device), batch["labels"]], dim=1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.float()

    @torch.no_grad()
    def generate_captions(self, features: dict[str, torch.Tensor], text: Gpt2Text, preset: GenerationPreset) -> list[str]:
        was_training = self.training
        self.eval()  # no dropout in a fine-tuned GPT-2: captions must not depend on the mode
        try:
            prefix = self.prefix(features)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
            # Given only embeddings, generate returns the new tokens alone.
            out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, **generation_kwargs(text, preset))
        finally:
            self.train(was_training)
        return text.decode_batch(out)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.mapper.parameters()) + ([] if self.config.freeze_lm else list(self.lm.parameters()))

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """CLIP (and a frozen GPT-2) in ``dtype``; the mapper and a trained GPT-2 stay fp32."""
        self.to(device)
        if dtype is not None and dtype != torch.float32:
            self.clip.to(dtype)
            if self.config.freeze_lm:
                self.lm.to(dtype)


def tiny_clipcap(
    captions: Sequence[str], *, image_size: int = 64, width: int = 32, seed: int = 0, **overrides: Any
) -> tuple[ClipCapModel, Gpt2Text]:
    """A random tiny ClipCap with a tokenizer trained on ``captions``; CPU-fast (tests, synthetic benchmark).

    Small prefix and mapper by default (4 tokens, 2 layers, 2 heads); ``overrides`` are config fields.
    """
    text = Gpt2Text(build_small_gpt2_tokenizer(captions))
    values: dict[str, Any] = dict(prefix_length=4, clip_length=4, mapper_layers=2, mapper_heads=2, max_caption_tokens=48) | overrides
    gpt2 = tiny_gpt2_config(len(text), text.eos_id, width)
    config = ClipCapConfig(clip_vision=tiny_clip_vision_config(image_size, width), gpt2=gpt2, **values)
    torch.manual_seed(seed)
    return ClipCapModel(config), text


def compose_clipcap(
    out: Path,
    *,
    clip: str,
    gpt2: str,
    mapper: str = "mlp",
    prefix_length: int | None = None,
    clip_length: int | None = None,
    freeze_lm: bool | None = None,
    normalize_prefix: bool = False,
    name: str = "",
    log: Callable[[str], None] = print,
) -> Path:
    """A ClipCap checkpoint from a pretrained CLIP (e.g. ``openai/clip-vit-large-patch14``) and GPT-2 (hub ids or
    local directories); the mapper starts untrained."""
    from models.checkpoint import Provenance, save
    from models.clip_parts import load_clip, tower_from
    from models.sources import resolve, source_sha

    log(f"loading CLIP from {clip}")
    vision, vision_weights = tower_from(load_clip(clip, "--clip"), "vision")
    log(f"loading GPT-2 from {gpt2}")
    lm, text = load_gpt2(gpt2)
    config = ClipCapConfig(
        clip_vision=vision,
        gpt2=config_kwargs(lm.config),
        mapper=mapper,
        prefix_length=prefix_length,
        clip_length=clip_length,
        freeze_lm=freeze_lm,
        normalize_prefix=normalize_prefix,
        name=name,
    )
    log(f"building {config.display_name}")
    model = ClipCapModel(config)
    model.clip.model.load_state_dict(vision_weights, strict=True)
    model.lm.load_state_dict(lm.state_dict(), strict=True)
    provenance = Provenance(
        sources=[
            {"part": "CLIP ViT (vision tower and projection)", "source": clip, "sha256": source_sha(resolve(clip, "--clip"))},
            {"part": "GPT-2 and its tokenizer", "source": gpt2, "sha256": source_sha(resolve(gpt2, "--gpt2"))},
        ],
        initialised=[f"{mapper} mapping network (train it: medcap train caption)"],
    )
    sha = save(model, text, out, provenance)
    log(f"wrote {out} (weights sha256 {sha})")
    return out


def _compose(request: ComposeRequest) -> Path:
    o = request.options
    lm = o["lm"]
    return compose_clipcap(
        request.out,
        clip=o["clip"],
        gpt2=o["gpt2"],
        mapper=o["mapper"],
        freeze_lm=None if lm is None else lm == "frozen",
        name=request.name,
        log=request.log,
    )


FAMILY = Family(
    config=ClipCapConfig,
    model=ClipCapModel,
    text=Gpt2Text,
    description="ClipCap: CLIP image embedding -> mapping network -> GPT-2 prefix (Mokady et al. 2021; Huynh et al.'s CLIP-Prefix)",
    # ClipCap's train.py: AdamW (no weight decay) at 2e-5, 5000 warm-up steps, batch 40, 10 epochs;
    # Huynh et al. add gradient clipping. No early stopping in either.
    fit_defaults={
        "epochs": 10,
        "batch_size": 40,
        "lr": 2e-5,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "warmup_steps": 5000,
        "patience": None,
    },
    compose=_compose,
)
