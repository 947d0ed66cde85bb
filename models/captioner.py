"""A loaded captioner of any family: checkpoint in, captions out, in batches, deterministically.

This is what ``medcap caption``, ``medcap evaluate`` and the caption workers use; the model is loaded once and
warmed, then every key image of a study goes through it in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_io.image_views import ImageView
from models import checkpoint
from models.families import CaptionModel
from models.generation import GenerationPreset, default_dtype, preset, select_device


@dataclass(frozen=True)
class ModelIdentity:
    """What an SR and the audit database record about the model that wrote a draft."""

    name: str
    model_type: str
    version: str
    weights_sha256: str
    path: str


class Captioner:
    """Any captioner family (models/families.py) behind one call: image views in, captions out."""

    def __init__(self, model: CaptionModel, text: Any, identity: ModelIdentity, device: torch.device) -> None:
        self.model = model.eval()  # type: ignore[attr-defined]
        self.text = text
        self.identity = identity
        self.device = device

    @classmethod
    def load(cls, directory: Path | str, device: str = "auto", dtype: torch.dtype | None = None) -> Captioner:
        target = select_device(device)
        if target.type == "cuda":
            # The Q-Formers stay fp32 (as HF BLIP-2 keeps them): TF32 matrix units run them several
            # times faster than plain fp32 at ~1e-3 relative error, far below bf16's in the parts around them.
            torch.backends.cuda.matmul.allow_tf32 = True
        model, text, provenance = checkpoint.load(Path(directory), target, dtype or default_dtype(target))
        identity = ModelIdentity(
            model.config.display_name,
            model.config.model_type,
            model.config.version,
            str(provenance.get("weights_sha256", "unknown")),
            str(Path(directory).resolve()),
        )
        return cls(model, text, identity, target)

    @property
    def views(self) -> tuple[ImageView, ...]:
        """The image views the model reads, as its family declares them (``dicom_io.model_input.prepare(views=...)``)."""
        return self.model.config.views

    def caption(
        self,
        inputs: dict[str, np.ndarray],
        generation: GenerationPreset | str = "fast",
        *,
        batch_size: int = 8,
        seed: int = 0,
    ) -> list[str]:
        """Caption N images given as {view name: (N, 3, S, S)} arrays (``SeriesInput.views``); other views are ignored."""
        settings = preset(generation) if isinstance(generation, str) else generation
        names = [v.name for v in self.views]
        missing = set(names) - set(inputs)
        if missing:
            raise ValueError(f"inputs: missing view(s) {sorted(missing)} for {self.identity.name}")
        count = {len(inputs[b]) for b in names}
        if len(count) != 1:
            raise ValueError(f"inputs: views disagree on the number of images {count}")
        torch.manual_seed(seed)  # beam search is deterministic; this pins any sampling-based preset too
        captions: list[str] = []
        total = count.pop()
        for start in range(0, total, batch_size):
            pixels = {b: torch.from_numpy(np.ascontiguousarray(inputs[b][start : start + batch_size])).to(self.device) for b in names}
            with torch.no_grad():
                captions.extend(self.model.generate_captions(self.model.encode(pixels), self.text, settings))
        return captions

    @property
    def reads_series(self) -> bool:
        """Whether the model reads a series' key images together with a prompt (``hf-vlm``)."""
        return bool(getattr(self.model, "reads_series", False))

    def caption_series(
        self,
        series: Sequence[SeriesRequest],
        generation: GenerationPreset | str = "fast",
        *,
        batch_size: int = 8,
        seed: int = 0,
    ) -> list[list[str]]:
        """One caption per key image of each series ({view: (K, 3, S, S)} and its header facts as a prompt text).

        A model that reads series gets each series' key images together, at most its config's
        ``max_images`` per prompt, with the facts; each key image gets the text of the prompt that
        read it, and about ``batch_size`` images go into one call. Any other model captions every
        key image alone (the facts unused), all series' images batched together.
        """
        settings = preset(generation) if isinstance(generation, str) else generation
        names = [v.name for v in self.views]
        counts = [len(views[names[0]]) if names[0] in views else 0 for views, _ in series]
        if not self.reads_series:
            flat = self.caption(
                {n: np.concatenate([views[n] for views, _ in series]) for n in names}, settings, batch_size=batch_size, seed=seed
            )
            return split(flat, counts)
        per_prompt = int(self.model.config.max_images)
        groups = [(i, start, min(start + per_prompt, count)) for i, count in enumerate(counts) for start in range(0, count, per_prompt)]
        texts: list[str] = []
        torch.manual_seed(seed)
        batch: list[tuple[int, int, int]] = []
        for k, group in enumerate(groups):
            batch.append(group)
            images = sum(end - start for _, start, end in batch)
            if k + 1 == len(groups) or images + (groups[k + 1][2] - groups[k + 1][1]) > batch_size:
                pixels = [
                    (torch.from_numpy(np.ascontiguousarray(series[i][0][names[0]][start:end])).to(self.device), series[i][1])
                    for i, start, end in batch
                ]
                with torch.no_grad():
                    texts.extend(self.model.generate_series_captions(pixels, self.text, settings))
                batch = []
        captions: list[list[str]] = [[] for _ in series]
        for (i, start, end), text in zip(groups, texts, strict=True):
            captions[i].extend([text] * (end - start))
        return captions

    def warm_up(self) -> None:
        """One tiny generation, so the first study does not pay for lazy initialisation."""
        self.caption({v.name: np.zeros((1, 3, v.size, v.size), dtype=np.float32) for v in self.views}, "fast")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.identity.name,
            "type": self.identity.model_type,
            "version": self.identity.version,
            "weights_sha256": self.identity.weights_sha256,
            "device": str(self.device),
        }


#: A series for :meth:`Captioner.caption_series`: its key images' views, and its header facts as a prompt text.
SeriesRequest = tuple[dict[str, np.ndarray], str]


def split(flat: Sequence[str], counts: Sequence[int]) -> list[list[str]]:
    """Captions of several series' images in one list, back into one list per series."""
    out, start = [], 0
    for count in counts:
        out.append(list(flat[start : start + count]))
        start += count
    return out


def summarise(captions: Sequence[str]) -> str:
    """One draft per series from its key images' captions: distinct sentences, in order."""
    seen: list[str] = []
    for caption in captions:
        for sentence in (s.strip() for s in caption.replace("\n", " ").split(". ")):
            sentence = sentence.rstrip(".").strip()
            if sentence and sentence not in seen:
                seen.append(sentence)
    return ". ".join(seen) + ("." if seen else "")
