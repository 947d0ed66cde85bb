"""``hf-vlm``: any transformers image-text-to-text model as a MedCap captioner.

MedGemma-class (Gemma 3 with a SigLIP encoder), Qwen-VL, LLaVA, Idefics: whatever
``AutoModelForImageTextToText`` and ``AutoProcessor`` load, by hub id or local directory.
``medcap model compose --model-type hf-vlm --vlm SOURCE`` turns it into a MedCap checkpoint (the
model's weights in MedCap's format, so that loading is strict and the weights hash names it in
every SR; its processor beside them) and the captioner runs it like every family.

Unlike the other families a VLM reads a series, not an image: the caption workers and ``medcap
caption`` hand it each series' key images together, at most ``max_images`` per prompt (more make
several prompts), with a prompt made from ``prompt_template`` and the series' header facts
(``models.grounding.prompt_for``). Grounding then checks its text like any model's. Images reach
it as the ``vlm`` view (the key image in [0, 1]) and its own processor resizes and normalises
them. It is not trained in MedCap: fine-tune it with transformers, then compose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_io.image_views import ImageView
from models.config import ConfigError, JsonConfig
from models.families import ComposeRequest, Family
from models.generation import GenerationPreset

MODEL_TYPE = "hf-vlm"
VIEW = "vlm"
PROCESSOR_DIR = "processor"
#: ``{facts}``: the series' header facts as ``models.grounding.prompt_for`` states them (empty when
#: there are none, e.g. an evaluation image); ``{images}``: how many key images the prompt carries.
DEFAULT_PROMPT = (
    "{facts} These are {images} key image(s) of one series of a radiology study. "
    "Describe the imaging findings in one to three short sentences."
)


@dataclass
class HfVlmConfig(JsonConfig):
    hf_config: dict[str, Any]  # the transformers model config (``config.to_dict()``); its model_type picks the architecture
    source: str = ""  # the hub id or directory it was composed from
    prompt_template: str = DEFAULT_PROMPT
    max_images: int = 4  # key images per prompt: as many as the model accepts (1 for single-image models such as LLaVA-1.5)
    image_size: int = 512  # side of the view handed to the processor, which resizes to what its model reads
    model_type: str = MODEL_TYPE
    version: str = "1.0.0"
    name: str = ""
    format_version: int = 1

    def __post_init__(self) -> None:
        self.require_model_type(MODEL_TYPE)
        self.require_format(1)
        if not isinstance(self.hf_config, dict) or not isinstance(self.hf_config.get("model_type"), str):
            raise ConfigError("hf_config: must be a transformers config as a dict, with its model_type")
        self.require_positive("max_images", "image_size")
        try:
            self.prompt_template.format(facts="", images=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"prompt_template: only {{facts}} and {{images}} may be filled in ({exc!r})") from None
        if len(self.display_name) > 64:
            raise ConfigError(f"name: at most 64 characters (the SR's device name), got {len(self.display_name)}")

    @property
    def display_name(self) -> str:
        return self.name or default_name(self.source, str(self.hf_config["model_type"]))

    @property
    def views(self) -> tuple[ImageView, ...]:
        return (ImageView(VIEW, self.image_size, "unit"),)

    def summary(self) -> list[str]:
        return [
            f"- model type: `{MODEL_TYPE}`, a transformers `{self.hf_config['model_type']}` image-text-to-text model from `{self.source}`",
            f"- up to {self.max_images} key image(s) per prompt, {self.image_size} px view; prompt: {self.prompt_template!r}",
        ]


def default_name(source: str, architecture: str) -> str:
    """The name SRs give a composed VLM: its hub id, or a local directory's name."""
    if source and not Path(source).expanduser().exists() and len(source) <= 64:
        return source
    return (Path(source).name or architecture)[:64] if source else architecture[:64]


def prompt_text(template: str, facts: str, images: int) -> str:
    return " ".join(template.format(facts=facts, images=images).split())


class VlmProcessor:
    """The model's own ``AutoProcessor`` (tokenizer, image processor, chat template), kept beside the weights."""

    def __init__(self, processor: Any) -> None:
        if getattr(processor, "chat_template", None) is None:
            raise ConfigError("the processor has no chat template: MedCap builds each prompt with it (an instruction-tuned model has one)")
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every prompt from its end

    def save(self, directory: Path) -> None:
        self.processor.save_pretrained(directory / PROCESSOR_DIR)

    @classmethod
    def load(cls, directory: Path) -> VlmProcessor:
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(directory / PROCESSOR_DIR, local_files_only=True))


def run_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that compute in it (compute capability 8.0 and newer), fp32 elsewhere: several
    VLMs (Gemma 3 among them) overflow in fp16, so older GPUs get fp32, not fp16."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


class HfVlmModel(nn.Module):
    """The transformers model, as a MedCap ``CaptionModel`` that also reads whole series."""

    reads_series = True  # models.captioner.Captioner.caption_series hands it a series' key images with their prompt

    def __init__(self, config: HfVlmConfig, vlm: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if vlm is None:
            from transformers import AutoConfig, AutoModelForImageTextToText

            values = dict(config.hf_config)
            vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
        self.vlm = vlm

    @torch.no_grad()
    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the VLM encodes its images together with the prompt: nothing to compute ahead
        return {"images": pixels[VIEW]}

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: Any) -> torch.Tensor:
        raise NotImplementedError("hf-vlm models are not trained in MedCap: fine-tune with transformers, then compose")

    def generate_captions(self, features: dict[str, torch.Tensor], text: VlmProcessor, preset: GenerationPreset) -> list[str]:
        """One caption per image, each alone with the prompt and no header facts (``medcap evaluate``'s images have none)."""
        return self.generate_series_captions([(image[None], "") for image in features["images"]], text, preset)

    @torch.no_grad()
    def generate_series_captions(
        self, groups: Sequence[tuple[torch.Tensor, str]], text: VlmProcessor, preset: GenerationPreset
    ) -> list[str]:
        """One text per group of key images ((K, 3, S, S) in [0, 1], K <= max_images) and its
        header facts: one prompt each, all groups in one batched ``generate``."""
        if not groups:
            return []
        processor = text.processor
        prompts, images = [], []
        for pixels, facts in groups:
            if not 1 <= len(pixels) <= self.config.max_images:
                raise ValueError(f"a prompt carries 1 to {self.config.max_images} images, got {len(pixels)}")
            content = [{"type": "image"} for _ in range(len(pixels))]
            content.append({"type": "text", "text": prompt_text(self.config.prompt_template, facts, len(pixels))})
            prompts.append(
                processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
            )
            images.append([as_rgb8(p) for p in pixels])
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
        parameter = next(self.vlm.parameters())
        inputs = {
            k: v.to(parameter.device, parameter.dtype) if v.is_floating_point() else v.to(parameter.device) for k, v in inputs.items()
        }
        beams = preset.num_beams
        out = self.vlm.generate(  # type: ignore[operator]
            **inputs,
            do_sample=False,
            num_beams=beams,
            max_new_tokens=preset.max_new_tokens,
            min_new_tokens=preset.min_new_tokens,
            repetition_penalty=preset.repetition_penalty,
            **({"length_penalty": preset.length_penalty} if beams > 1 else {}),
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        # the family chooses its dtype (run_dtype) rather than the frozen-part default, which is fp16 on older GPUs
        self.vlm.to(device=device, dtype=run_dtype(torch.device(device)))


def as_rgb8(pixels: torch.Tensor) -> np.ndarray:
    """A (3, S, S) [0, 1] view as the (S, S, 3) uint8 image a processor expects."""
    array: np.ndarray = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return array


def compose(request: ComposeRequest) -> Any:
    """A checkpoint from a transformers image-text-to-text model (hub id or directory), every weight as the source has it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from models.checkpoint import Provenance, save
    from models.sources import ComposeError, resolve, source_sha
    from models.weights import parse_dtype

    source = str(request.options["vlm"])
    resolved = resolve(source, "--vlm")
    stored = request.options.get("frozen_dtype") or "source"
    try:
        processor = AutoProcessor.from_pretrained(resolved)
        loaded: Any = AutoModelForImageTextToText.from_pretrained(
            resolved, output_loading_info=True, dtype="auto" if stored == "source" else parse_dtype(stored)
        )
        vlm, info = loaded
    except (OSError, ValueError) as exc:
        raise ComposeError(f"--vlm {source}: not a transformers image-text-to-text model ({exc})") from None
    if info["missing_keys"]:
        raise ComposeError(f"--vlm {source}: {len(info['missing_keys'])} weight(s) missing, e.g. {sorted(info['missing_keys'])[:5]}")
    try:
        codec = VlmProcessor(processor)
        config = HfVlmConfig(
            hf_config=vlm.config.to_dict(),
            source=source,
            prompt_template=request.options.get("vlm_prompt") or DEFAULT_PROMPT,
            max_images=int(request.options.get("max_images") or 4),
            image_size=int(request.options.get("vlm_image_size") or 512),
            name=request.name,
        )
    except ConfigError as exc:
        raise ComposeError(f"--vlm {source}: {exc}") from None
    request.log(
        f"composing {config.display_name} ({vlm.config.model_type}, {sum(p.numel() for p in vlm.parameters()) / 1e6:.1f} M parameters)"
    )
    provenance = Provenance(sources=[{"part": "vlm", "source": source, "sha256": source_sha(resolved)}])
    return save(HfVlmModel(config, vlm), codec, request.out, provenance)


FAMILY = Family(
    config=HfVlmConfig,
    model=HfVlmModel,
    text=VlmProcessor,
    description="any transformers image-text-to-text model (MedGemma, Qwen-VL, LLaVA, Idefics)",
    compose=compose,
)
