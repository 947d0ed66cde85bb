"""Frozen image features, computed once per distinct image and reused every epoch.

The encoders of every captioner are frozen, so training pays for them once per image, not once
per step: the notes' main lever on training cost. Shared by both MSMedCap trainers
(``models/msmedcap/training.py``) and ``train caption`` (``models/fitting.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.datasets import CaptionRecord, load_image

ImageTransform = Callable[[np.ndarray], dict[str, np.ndarray]]


def image_transform_for(model: torch.nn.Module, *, training: bool = False) -> ImageTransform:
    """Each of the model's views from the raw [0,1] image (never one from another's): the views it
    reads when captioning (``config.views``), or (``training``) in training where they differ (``config.train_views``)."""
    from dicom_io.image_views import view_array

    config: Any = model.config  # a family's config (models/families.py), not a tensor
    views = config.train_views if training and hasattr(config, "train_views") else config.views

    def transform(image: np.ndarray) -> dict[str, np.ndarray]:
        return {view.name: view_array(view, image)[0] for view in views}

    return transform


def view_names(model: torch.nn.Module) -> list[str]:
    """The names of the views ``model`` reads (what :func:`encode_images` passes to its ``encode``)."""
    config: Any = model.config
    return [view.name for view in config.views]


@dataclass
class Features:
    """Frozen-encoder outputs, one row per distinct image, and each record's row."""

    by_name: dict[str, Any]  # feature name -> torch.Tensor (memory) or np.memmap (disk), (images, ...)
    rows: list[int]

    def batch(self, name: str, records: Sequence[int], device: torch.device) -> torch.Tensor:
        rows = [self.rows[i] for i in records]
        return torch.as_tensor(np.asarray(self.by_name[name][rows]), dtype=torch.float32).to(device)

    def batches(self, records: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        return {name: self.batch(name, records, device) for name in self.by_name}


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    records: Sequence[CaptionRecord],
    transform: ImageTransform,
    branches: Sequence[str],
    batch_size: int,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> Features:
    """Encode each distinct image once (COCO-style data has several captions per image) with the
    model's frozen ``encode``, reading the views in ``branches``.

    In memory by default (fp32). With ``cache_dir``, rows go to fp16 memory-mapped ``.npy`` files
    there, read back batch by batch: real encoders produce 1.4 MB (EVA, 224 px) to 4 MB (SAM,
    channel layout) per image in fp32, more than RAM for ROCO-sized data.
    """
    paths: dict[str, int] = {}
    rows = [paths.setdefault(str(r.image_path), len(paths)) for r in records]
    unique = list(paths)
    store: dict[str, Any] = {}
    encode: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = model.encode  # type: ignore[assignment]
    for start in tqdm(range(0, len(unique), batch_size), desc="encoding images", unit="batch", disable=not progress):
        chunk = unique[start : start + batch_size]
        inputs = [transform(load_image(path, color="L")) for path in chunk]
        tokens = encode({b: torch.from_numpy(np.stack([i[b] for i in inputs])) for b in branches})
        for b in tokens:
            value = tokens[b].float().cpu()
            if b not in store:
                shape = (len(unique), *value.shape[1:])
                if cache_dir is None:
                    store[b] = torch.empty(shape)
                else:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    store[b] = np.lib.format.open_memmap(cache_dir / f"{b}.npy", mode="w+", dtype=np.float16, shape=shape)
            store[b][start : start + len(chunk)] = value if cache_dir is None else value.numpy().astype(np.float16)
    for b in store:
        if cache_dir is not None:
            store[b].flush()
    return Features(store, rows)
