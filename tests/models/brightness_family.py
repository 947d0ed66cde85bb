"""A captioner family that exists only for the tests, to show that a new family is this one module
plus its registration (:data:`REGISTRATION`, a line in ``models.families.REGISTRY``), nothing else.

It reads one view of its own, ``unit`` (the key image as a small square left in [0, 1]), and says
how bright the image is with a word list given when it is composed (``--words``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dicom_io.image_views import ImageView
from models.config import ConfigError, JsonConfig
from models.families import ComposeOption, ComposeRequest, Family, Registration
from models.generation import GenerationPreset


@dataclass
class BrightnessConfig(JsonConfig):
    words: list[str]
    view_size: int = 32
    model_type: str = "brightness"
    version: str = "0.1.0"
    name: str = ""

    def __post_init__(self) -> None:
        self.require_model_type("brightness")
        self.require_positive("view_size")
        if not self.words or not all(isinstance(w, str) and w for w in self.words):
            raise ConfigError(f"words: must be a non-empty list of words, got {self.words!r}")

    @property
    def display_name(self) -> str:
        return self.name or "Brightness"

    @property
    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("unit", self.view_size, "unit"),)

    def summary(self) -> list[str]:
        return [f"- model type: `brightness`, {len(self.words)} words, a {self.view_size} px unit view"]


class Words:
    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)

    def save(self, directory: Path) -> None:
        (directory / "words.json").write_text(json.dumps(self.words))

    @classmethod
    def load(cls, directory: Path) -> Words:
        return cls(json.loads((directory / "words.json").read_text()))


class BrightnessModel(nn.Module):
    def __init__(self, config: BrightnessConfig) -> None:
        super().__init__()
        self.config = config
        self.gain = nn.Parameter(torch.ones(1))

    @torch.no_grad()
    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unit = pixels["unit"]
        return {"mean": unit.mean(dim=(1, 2, 3)) * self.gain, "side": torch.full((unit.shape[0],), unit.shape[-1])}

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: Words) -> torch.Tensor:
        return ((self.gain - 1) ** 2).sum()

    def generate_captions(self, features: dict[str, torch.Tensor], text: Words, preset: GenerationPreset) -> list[str]:
        return [
            f"{text.words[min(int(mean * len(text.words)), len(text.words) - 1)]} image, {int(side)} px"
            for mean, side in zip(features["mean"].tolist(), features["side"].tolist(), strict=True)
        ]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.gain]

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        self.to(device)


def compose(request: ComposeRequest) -> Any:
    from models.checkpoint import Provenance, save

    config = BrightnessConfig(words=request.options["words"].split(","), view_size=request.options["view_size"], name=request.name)
    request.log(f"building {config.display_name}")
    return save(BrightnessModel(config), Words(config.words), request.out, Provenance(sources=[{"part": "all", "source": "tests"}]))


FAMILY = Family(config=BrightnessConfig, model=BrightnessModel, text=Words, description="Brightness (tests)", compose=compose)

REGISTRATION = Registration(
    "tests.models.brightness_family",
    (
        ComposeOption("words", "comma-separated words, darkest first", required=True),
        ComposeOption("view_size", "side of the unit view", default=32, kind=int),
    ),
)
