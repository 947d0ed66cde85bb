"""Every captioner MedCap runs, found by the ``model_type`` in its checkpoint's ``config.json``.

A family is three classes: a config (validating, stored as ``config.json``), a model (an
``nn.Module`` implementing :class:`CaptionModel`) and a text codec (the tokenizer or vocabulary,
saved beside the weights), plus the function that composes a checkpoint from pretrained parts.
Loading, captioning, training, evaluation, ``medcap model compose`` and the workers go through
this one interface, so a new captioner is a new module (its ``FAMILY``) and one line in
:data:`REGISTRY` (the module, and the compose flags it reads), and nothing else changes.

Images reach every model as named views, ``{name: (B, 3, S, S)}``: a family's config declares
them in ``config.views`` (``dicom_io.image_views.ImageView``: name, size, normalisation), and the
pipeline (``dicom_io.model_input.prepare``) computes exactly those from each key image.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the registry is read by the CLI's argument parser, which must not pay for torch
    import numpy as np
    import torch
    from torch import nn

    from dicom_io.image_views import ImageView
    from models.generation import GenerationPreset


@dataclass(frozen=True)
class ComposeOption:
    """A ``medcap model compose`` flag a family reads: ``name`` ``blip2_itm`` is ``--blip2-itm``.

    Families may share a flag (``--clip``) if they agree on its default, choices and kind; its help
    then names them all. ``required``: the family cannot compose without it. ``repeat``: may be
    given several times (a list). ``data``: ``[GROUP=]SPEC`` caption data, read by the command and
    handed over as :attr:`ComposeRequest.captions` (training captions, for a vocabulary).
    """

    name: str
    help: str
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    kind: type = str  # str or int
    repeat: bool = False
    data: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"ComposeOption.name must be a lower-case identifier, got {self.name!r}")
        if self.name in _COMMON_COMPOSE_FLAGS:
            raise ValueError(f"ComposeOption.name: --{self.name} is common to every family, not declared by one")
        if not self.help:
            raise ValueError(f"ComposeOption.help: --{self.name} needs a help text")
        if self.kind not in (str, int):
            raise ValueError(f"ComposeOption.kind: str or int, got {self.kind!r}")
        if self.data and not self.repeat:
            raise ValueError(f"ComposeOption.repeat: --{self.name} holds caption data specs, which repeat")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_COMMON_COMPOSE_FLAGS = ("model_type", "out", "name", "threads")


@dataclass(frozen=True)
class Registration:
    """Where a ``model_type``'s ``FAMILY`` lives, and the compose flags it reads (known without
    importing the module: the argument parser must not pay for torch)."""

    module: str
    compose: tuple[ComposeOption, ...] = ()


@dataclass(frozen=True)
class ComposeRequest:
    """What ``medcap model compose`` hands a family's :attr:`Family.compose`."""

    model_type: str
    out: Path
    options: Mapping[str, Any]  # every flag the registration declares, by name (None where not given)
    captions: Sequence[str]  # training captions from the registration's data flag; empty without one
    name: str  # display name for SRs and the model card ("" for the family's own)
    log: Callable[[str], None]


_BLIP2 = ComposeOption("blip2", "BLIP-2 (HF format) hub id or directory, e.g. Salesforce/blip2-opt-2.7b", required=True)
_SAM = ComposeOption("sam", "SAM hub id or directory (facebook/sam-vit-base, wanglab/medsam-vit-base) or a .pth", required=True)
_FROZEN_DTYPE = ComposeOption(
    "frozen_dtype",
    "store the frozen encoders and the LM (hf-vlm: the whole model) in this dtype (default: as the source stores them)",
    default="source",
    choices=("source", "bf16", "fp16", "fp32"),
)
_MSMEDCAP = (
    ComposeOption(
        "bert",
        "BERT (id or directory, weights and tokenizer) that both Q-Formers' text side and the SAM Q-Former start from, as in LAVIS",
        default="bert-base-uncased",
    ),
    ComposeOption(
        "eval_image_size",
        "CLIP view when captioning (default: 364 for a ViT trained at 224, as the paper evaluates; else its training size)",
        kind=int,
    ),
    _FROZEN_DTYPE,
    ComposeOption("sam_layout", "SAM token layout (the official code: channel)", default="channel", choices=("channel", "spatial")),
    ComposeOption("prompt", "text before every caption, in training and inference", default=""),
)
_BLIP2_ITM = ComposeOption(
    "blip2_itm",
    "BLIP-2's stage-1 checkpoint (Salesforce/blip2-itm-vit-g): the CLIP Q-Former's text side and ITC/ITM heads from it instead of from --bert",
)
_CLIP = ComposeOption("clip", "CLIPModel hub id or directory, e.g. openai/clip-vit-large-patch14", required=True)
_GPT2 = ComposeOption("gpt2", "GPT-2 hub id or directory with its tokenizer, e.g. gpt2", required=True)
_CAPTIONS = ComposeOption("data", "training captions (same specs as train) for the vocabulary", required=True, repeat=True, data=True)
_MIN_WORD_COUNT = ComposeOption("min_word_count", "words seen fewer times become <UNK>", default=5, kind=int)

#: model_type -> where its ``FAMILY`` is and what composing it reads. Modules are imported
#: lazily: loading one captioner never imports the others.
REGISTRY: dict[str, Registration] = {
    "msmedcap": Registration("models.msmedcap", (_BLIP2, _SAM, _BLIP2_ITM, *_MSMEDCAP)),
    "blip2": Registration("models.msmedcap", (_BLIP2, _BLIP2_ITM, *_MSMEDCAP)),
    "sam_blip2": Registration("models.msmedcap", (_BLIP2, _SAM, *_MSMEDCAP)),
    "clipcap": Registration(
        "models.clipcap",
        (
            _CLIP,
            _GPT2,
            ComposeOption(
                "mapper",
                "mapping network (paper: MLP with GPT-2 fine-tuned, transformer with GPT-2 frozen)",
                default="mlp",
                choices=("mlp", "transformer"),
            ),
            ComposeOption("lm", "override the mapper's GPT-2 default", choices=("frozen", "finetuned")),
        ),
    ),
    "sbg": Registration("models.sbg", (_CLIP, _GPT2, _CAPTIONS)),
    "cnn_lstm": Registration(
        "models.cnn_lstm",
        (
            ComposeOption("mobilenet", "MobileNetV2 hub id or directory, e.g. google/mobilenet_v2_1.0_224", required=True),
            _CAPTIONS,
            _MIN_WORD_COUNT,
        ),
    ),
    "clip_transformer": Registration("models.clip_transformer", (_CLIP, _CAPTIONS, _MIN_WORD_COUNT)),
    "hf-vlm": Registration(
        "models.hf_vlm",
        (
            ComposeOption("vlm", "transformers image-text-to-text model, hub id or directory, e.g. google/medgemma-4b-it", required=True),
            _FROZEN_DTYPE,
            ComposeOption(
                "max_images", "key images per prompt: as many as the model accepts (1 for single-image models)", default=4, kind=int
            ),
            ComposeOption("vlm_image_size", "side of the key image view handed to the model's processor", default=512, kind=int),
            ComposeOption("vlm_prompt", "prompt template; {facts}: the series' header facts, {images}: how many key images"),
        ),
    ),
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

    config: type[Any]
    model: type[Any]
    text: type[Any]
    description: str
    fit_defaults: dict[str, Any] = field(default_factory=dict)
    #: Builds a checkpoint from pretrained parts (``medcap model compose``); None: this family cannot be composed.
    compose: Callable[[ComposeRequest], Any] | None = None


def family(model_type: str) -> Family:
    try:
        module = REGISTRY[model_type].module
    except KeyError:
        raise UnknownModelType(f"model_type: {model_type!r} is not one of {sorted(REGISTRY)}") from None
    return importlib.import_module(module).FAMILY


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


def compose_flags() -> dict[str, tuple[ComposeOption, tuple[str, ...]]]:
    """Every compose flag of every registered family, once: name -> (the option, the model types
    that read it). Families sharing a flag must agree on everything but its help."""
    flags: dict[str, tuple[ComposeOption, tuple[str, ...]]] = {}
    for model_type, registration in REGISTRY.items():
        for option in registration.compose:
            if option.name not in flags:
                flags[option.name] = (option, (model_type,))
                continue
            first, readers = flags[option.name]
            mine = (option.required, option.default, option.choices, option.kind, option.repeat, option.data)
            theirs = (first.required, first.default, first.choices, first.kind, first.repeat, first.data)
            if mine[1:] != theirs[1:]:
                raise ValueError(f"{option.flag}: {model_type} declares it unlike {', '.join(readers)} (default, choices or kind differ)")
            flags[option.name] = (first, (*readers, model_type))
    return flags
