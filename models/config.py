"""What every captioner family's config shares: JSON round trip, checks that name the field.

Each family's own config (``models/msmedcap/config.py``, ``models/clipcap.py``, ...) is a
dataclass built on :class:`JsonConfig` and stored as ``config.json`` in every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dicom_io.image_views import ImageView


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
    """A captioner that reads one CLIP-normalised view, named ``clip``, at its CLIP ViT's size."""

    @property
    def view_size(self) -> int:
        return int(getattr(self, "clip_vision", {}).get("image_size", 224))

    @property
    def views(self) -> tuple[ImageView, ...]:
        return (ImageView("clip", self.view_size, "clip"),)
