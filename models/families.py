"""Every captioner MedCap runs, found by the ``model_type`` in its checkpoint's ``config.json``.

A family is three classes: a config (validating, stored as ``config.json``), a model (an
``nn.Module`` implementing :class:`CaptionModel`) and a text codec (the tokenizer or vocabulary,
saved beside the weights). Loading, captioning, training, evaluation and the workers go through
this one interface, so a new captioner is a new module here and nothing else changes.

Images reach every model as named views, ``{name: (B, 3, S, S)}``: a family's config declares
them in ``config.views`` (``dicom_io.image_views.ImageView``: name, size, normalisation), and the
pipeline (``dicom_io.model_input.prepare``) computes exactly those from each key image.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the registry is read by the CLI's argument parser, which must not pay for torch
    import numpy as np
    import torch
    from torch import nn

    from dicom_io.image_views import ImageView
    from models.generation import GenerationPreset

#: model_type -> module holding its ``FAMILY``. Imported lazily: loading one captioner never
#: imports the others.
MODULES: dict[str, str] = {
    "msmedcap": "models.msmedcap",
    "blip2": "models.msmedcap",
    "sam_blip2": "models.msmedcap",
    "clipcap": "models.clipcap",
    "sbg": "models.sbg",
    "cnn_lstm": "models.cnn_lstm",
    "clip_transformer": "models.clip_transformer",
}


class UnknownModelType(ValueError):
    pass


class CaptionConfig(Protocol):
    model_type: str
    version: str

    @property
    def display_name(self) -> str: ...  # what SRs and the audit trail name the model

    @property
    def views(self) -> tuple[ImageView, ...]: ...  # the image views the model reads when captioning

    def to_json(self) -> str: ...

    def summary(self) -> list[str]: ...  # model-card lines, "- ..." markdown

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionConfig: ...


class TextCodec(Protocol):
    """A family's tokenizer(s) or vocabulary; saved into and loaded from the checkpoint directory."""

    def save(self, directory: Path) -> None: ...

    @classmethod
    def load(cls, directory: Path) -> TextCodec: ...


@runtime_checkable
class CaptionModel(Protocol):
    """What every captioner implements (an ``nn.Module``).

    Training caches ``encode``'s output per image (the frozen part runs once per image, not once
    per epoch), then optimises ``trainable_parameters`` on ``caption_loss``; inference is
    ``generate_captions(encode(pixels))``.
    """

    config: Any

    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Frozen image features, without gradients: {name: (B, ...)} tensors."""
        ...

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: Any) -> torch.Tensor:
        """Mean training loss of a batch (the model may add auxiliary terms, e.g. SBG's keyword scores)."""
        ...

    def generate_captions(self, features: dict[str, torch.Tensor], text: Any, preset: GenerationPreset) -> list[str]:
        """One caption per image, decoded to text and stripped; deterministic for a fixed preset."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """Move to ``device``; frozen parts in ``dtype`` (bf16 on CUDA) where the model allows."""
        ...


class ImageCaptioner(Protocol):
    """What the caption workers and ``medcap caption`` need of a loaded captioner
    (:class:`models.captioner.Captioner`, :class:`models.batching.CaptionBatcher`): who it is, the
    image views it reads, captions. A protocol, so ``workers/drafting.py`` imports no torch."""

    @property
    def identity(self) -> object: ...  # models.captioner.ModelIdentity: name, model_type, version, weights_sha256

    @property
    def views(self) -> tuple[ImageView, ...]: ...  # what dicom_io.model_input.prepare computes for it

    def caption(self, inputs: dict[str, np.ndarray], generation: str = ..., *, batch_size: int = ..., seed: int = ...) -> list[str]: ...


@dataclass(frozen=True)
class Family:
    """One kind of captioner: its classes, and its paper's training defaults for ``medcap train caption``."""

    config: type
    model: type
    text: type
    description: str
    fit_defaults: dict[str, Any] = field(default_factory=dict)


def family(model_type: str) -> Family:
    try:
        module = MODULES[model_type]
    except KeyError:
        raise UnknownModelType(f"model_type: {model_type!r} is not one of {sorted(MODULES)}") from None
    return importlib.import_module(module).FAMILY  # type: ignore[no-any-return]


def read_config(path: Path) -> Any:
    """``config.json`` as its family's config object, validated."""
    from models.config import ConfigError

    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ConfigError(f"{path}: model_type is missing")
    try:
        return family(str(values["model_type"])).config.from_dict(values)
    except UnknownModelType as exc:
        raise ConfigError(f"{path}: {exc}") from None
