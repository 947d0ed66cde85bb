"""The configuration of an MSMedCap-family captioner, stored as ``config.json`` in every checkpoint.

One config describes all three models of the family: MSMedCap (CLIP + SAM branches),
BLIP-2 (CLIP only) and SAM-BLIP2 (SAM only). They are the same code with different branches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dicom_io.image_views import ImageView
from models.config import ConfigError, JsonConfig

MODEL_TYPES = {"msmedcap": ("clip", "sam"), "blip2": ("clip",), "sam_blip2": ("sam",)}
SAM_LAYOUTS = ("channel", "spatial")
FORMAT_VERSION = 1


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
    #: CLIP view in training (LAVIS: 224, EVA's own size).
    clip_image_size: int = 224
    #: CLIP view when captioning and evaluating; None: as in training. The paper evaluates at 364
    #: (``caption_coco_opt2.7b``) with 224 px weights; the ViT interpolates its position embeddings.
    eval_clip_image_size: int | None = None
    sam_image_size: int = 1024
    #: Width of the ITC projections (stage 1).
    itc_dim: int = 256
    #: Text before the caption, in training and at inference alike (the official code mixes them).
    prompt: str = ""
    #: LM tokens of BOS + prompt + caption + eos in training (LAVIS/MSMedCap ``max_txt_len``: 320).
    max_text_tokens: int = 320
    #: The LM token that ends a caption (OPT: "\n").
    eos_text: str = "\n"
    #: Whether the Q-Formers carry their text side (word/position embeddings, text feed-forward
    #: layers, ITC/ITM/ITG heads). Only stage 1 uses it; inference checkpoints leave it out, as
    #: LAVIS deletes it for stage 2 (about 0.9 GB fp32 at full size).
    qformer_text: bool = True
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
        if self.eval_clip_image_size is not None:
            self.require_positive("eval_clip_image_size")
        if not isinstance(self.qformer_text, bool):
            raise ConfigError(f"qformer_text: must be true or false, got {self.qformer_text!r}")
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
    def views(self) -> tuple[ImageView, ...]:
        """The views captioning reads, one per branch and named after it (CLIP at the evaluation size)."""
        return self._views(self.eval_clip_image_size or self.clip_image_size)

    @property
    def train_views(self) -> tuple[ImageView, ...]:
        """The views training reads."""
        return self._views(self.clip_image_size)

    def _views(self, clip_size: int) -> tuple[ImageView, ...]:
        sizes = {"clip": (clip_size, "clip"), "sam": (self.sam_image_size, "sam")}
        return tuple(ImageView(b, *sizes[b]) for b in self.branches)

    def summary(self) -> list[str]:
        return [
            f"- model type: `{self.model_type}` (branches: {', '.join(self.branches)}), version {self.version}",
            f"- SAM token layout: `{self.sam_layout}`" if "sam" in self.branches else "- no SAM branch",
            f"- queries per branch: {self.num_query_tokens}; prompt: {self.prompt!r}",
            f"- CLIP view: {self.clip_image_size} px in training, {self.eval_clip_image_size or self.clip_image_size} px when captioning"
            if "clip" in self.branches
            else "- no CLIP branch",
            "- Q-Former text side: included (stage 1 can train it)"
            if self.qformer_text
            else "- Q-Former text side: left out (an inference checkpoint)",
        ]
