"""A loaded captioner: checkpoint in, captions out, in batches, deterministically.

This is what ``medcap caption`` and (later) the GPU workers use; the model is loaded once and
warmed, then every key image of a study goes through it in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import checkpoint
from models.generation import GenerationPreset, default_dtype, preset, select_device
from models.msmedcap import MedCapModel
from models.tokenizers import Tokenizers


@dataclass(frozen=True)
class ModelIdentity:
    """What an SR and the audit database record about the model that wrote a draft."""

    name: str
    model_type: str
    version: str
    weights_sha256: str
    path: str


class Captioner:
    def __init__(self, model: MedCapModel, tokenizers: Tokenizers, identity: ModelIdentity, device: torch.device) -> None:
        self.model = model.eval()
        self.tokenizers = tokenizers
        self.identity = identity
        self.device = device
        self.eos_id = tokenizers.eos_id(model.config.eos_text)

    @classmethod
    def load(cls, directory: Path | str, device: str = "auto", dtype: torch.dtype | None = None) -> Captioner:
        target = select_device(device)
        model, tokenizers, provenance = checkpoint.load(Path(directory), target, dtype or default_dtype(target))
        identity = ModelIdentity(model.config.display_name, model.config.model_type, model.config.version,
                                 str(provenance.get("weights_sha256", "unknown")), str(Path(directory).resolve()))  # fmt: skip
        return cls(model, tokenizers, identity, target)

    @property
    def image_sizes(self) -> tuple[int, int]:
        """(CLIP, SAM) input sizes the model expects."""
        return self.model.config.clip_image_size, self.model.config.sam_image_size

    @property
    def branches(self) -> tuple[str, ...]:
        return self.model.config.branches

    def caption(
        self, inputs: dict[str, np.ndarray], generation: GenerationPreset | str = "fast", *, batch_size: int = 8, seed: int = 0,
    ) -> list[str]:  # fmt: skip
        """Caption N images given as {branch: (N, 3, S, S)} arrays (the branch transforms' output)."""
        settings = preset(generation) if isinstance(generation, str) else generation
        missing = set(self.branches) - set(inputs)
        if missing:
            raise ValueError(f"inputs: missing {sorted(missing)} for {self.identity.name}")
        count = {len(inputs[b]) for b in self.branches}
        if len(count) != 1:
            raise ValueError(f"inputs: branches disagree on the number of images {count}")
        torch.manual_seed(seed)  # beam search is deterministic; this pins any sampling-based preset too
        captions: list[str] = []
        total = count.pop()
        for start in range(0, total, batch_size):
            pixels = {b: torch.from_numpy(np.ascontiguousarray(inputs[b][start : start + batch_size])).to(self.device) for b in self.branches}
            n = pixels[self.branches[0]].shape[0]
            prompt = {k: v.to(self.device) for k, v in self.tokenizers.prompt_batch(self.model.config.prompt, n).items()}
            ids = self.model.generate(pixels, prompt["input_ids"], prompt["attention_mask"], settings, self.eos_id,
                                      int(self.tokenizers.lm.pad_token_id))  # fmt: skip
            captions.extend(text.strip() for text in self.tokenizers.lm.batch_decode(ids, skip_special_tokens=True))
        return captions

    def warm_up(self) -> None:
        """One tiny generation, so the first study does not pay for lazy initialisation."""
        c = self.model.config
        sizes = {"clip": c.clip_image_size, "sam": c.sam_image_size}
        self.caption({b: np.zeros((1, 3, sizes[b], sizes[b]), dtype=np.float32) for b in self.branches}, "fast")

    def describe(self) -> dict[str, Any]:
        return {"name": self.identity.name, "type": self.identity.model_type, "version": self.identity.version,
                "weights_sha256": self.identity.weights_sha256, "device": str(self.device)}  # fmt: skip


def summarise(captions: Sequence[str]) -> str:
    """One draft per series from its key images' captions: distinct sentences, in order."""
    seen: list[str] = []
    for caption in captions:
        for sentence in (s.strip() for s in caption.replace("\n", " ").split(". ")):
            sentence = sentence.rstrip(".").strip()
            if sentence and sentence not in seen:
                seen.append(sentence)
    return ". ".join(seen) + ("." if seen else "")
