"""The configuration of a MedCap captioner, stored as ``config.json`` in every checkpoint.

One config describes all three models of the family: MSMedCap (CLIP + SAM branches),
BLIP-2 (CLIP only) and SAM-BLIP2 (SAM only). They are the same code with different branches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = {"msmedcap": ("clip", "sam"), "blip2": ("clip",), "sam_blip2": ("sam",)}
SAM_LAYOUTS = ("channel", "spatial")
FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


class JsonConfig:
    """JSON round trip and shared checks for the dataclass configs of every captioner family."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> Any:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def require_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value!r}")

    def require_model_type(self, expected: str) -> None:
        if getattr(self, "model_type", None) != expected:
            raise ConfigError(f"model_type: {getattr(self, 'model_type', None)!r} is not {expected}")

    def require_arguments(self, name: str, config_class: type | None = None) -> None:
        """Field ``name`` is a non-empty dict of a transformers config's arguments (checked by building it)."""
        value = getattr(self, name)
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{name}: must be a non-empty dict of transformers config arguments")
        if config_class is not None:
            try:
                config_class(**value)
            except Exception as exc:  # ValueError, TypeError or huggingface_hub's StrictDataclassError, by version
                raise ConfigError(f"{name}: {exc}") from None

    def require_format(self, understood: int) -> None:
        version = int(getattr(self, "format_version", 1))
        if version > understood:
            raise ConfigError(f"format_version: {version} is newer than this MedCap understands ({understood})")


class ClipViewConfig(JsonConfig):
    """A captioner that reads the CLIP view only (every family but MSMedCap's SAM branches)."""

    @property
    def branches(self) -> tuple[str, ...]:
        return ("clip",)

    @property
    def view_size(self) -> int:
        return int(getattr(self, "clip_vision", {}).get("image_size", 224))

    @property
    def image_sizes(self) -> tuple[int, int | None]:
        return self.view_size, None


@dataclass
class MedCapConfig(JsonConfig):
    model_type: str
    #: ``transformers.Blip2VisionConfig`` arguments (EVA ViT-g for real models); None without a CLIP branch.
    clip_vision: dict[str, Any] | None
    #: ``transformers.SamVisionConfig`` arguments; None without a SAM branch.
    sam_vision: dict[str, Any] | None
    #: ``transformers.Blip2QFormerConfig`` arguments shared by both Q-Formers; each branch sets its
    #: own ``encoder_hidden_size`` from its encoder and the SAM layout.
    qformer: dict[str, Any]
    #: ``transformers.OPTConfig`` arguments of the frozen language model.
    lm: dict[str, Any]
    num_query_tokens: int = 32
    #: ``channel``: the official code's 256 tokens x 4096 (each SAM neck channel's 64x64 map);
    #: ``spatial``: 4096 tokens x 256 with SAM's dense positional encoding added.
    sam_layout: str = "channel"
    clip_image_size: int = 224
    sam_image_size: int = 1024
    #: Width of the ITC projections (stage 1).
    itc_dim: int = 256
    #: Text before the caption, in training and at inference alike (the official code mixes them).
    prompt: str = ""
    max_text_tokens: int = 64
    #: The LM token that ends a caption (OPT: "\n").
    eos_text: str = "\n"
    version: str = "0.1.0"
    name: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: {self.model_type!r} is not one of {sorted(MODEL_TYPES)}")
        if "clip" in self.branches and not self.clip_vision:
            raise ConfigError(f"clip_vision: required for model_type {self.model_type}")
        if "sam" in self.branches and not self.sam_vision:
            raise ConfigError(f"sam_vision: required for model_type {self.model_type}")
        if self.sam_layout not in SAM_LAYOUTS:
            raise ConfigError(f"sam_layout: {self.sam_layout!r} is not one of {SAM_LAYOUTS}")
        self.require_positive("num_query_tokens", "clip_image_size", "sam_image_size", "itc_dim", "max_text_tokens")
        self.require_format(FORMAT_VERSION)

    @property
    def branches(self) -> tuple[str, ...]:
        return MODEL_TYPES[self.model_type]

    @property
    def display_name(self) -> str:
        return self.name or {"msmedcap": "MSMedCap", "blip2": "BLIP-2", "sam_blip2": "SAM-BLIP2"}[self.model_type]

    def with_model_type(self, model_type: str) -> MedCapConfig:
        """The same parts as another family member (BLIP-2 and SAM-BLIP2 are configurations, not copies)."""
        values = asdict(self) | {"model_type": model_type, "name": ""}
        branches = MODEL_TYPES.get(model_type, ())
        if "clip" not in branches:
            values["clip_vision"] = None
        if "sam" not in branches:
            values["sam_vision"] = None
        return MedCapConfig(**values)

    @property
    def image_sizes(self) -> tuple[int, int | None]:
        return self.clip_image_size if "clip" in self.branches else None, self.sam_image_size if "sam" in self.branches else None

    def summary(self) -> list[str]:
        return [
            f"- model type: `{self.model_type}` (branches: {', '.join(self.branches)}), version {self.version}",
            f"- SAM token layout: `{self.sam_layout}`" if "sam" in self.branches else "- no SAM branch",
            f"- queries per branch: {self.num_query_tokens}; prompt: {self.prompt!r}",
        ]
