"""``medcap evaluate``: caption a test split with several checkpoints and score them side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from models.caption_metrics import evaluate_models
from models.captioner import Captioner
from models.datasets import CaptionRecord, load_image, references_by_image
from models.features import image_transform_for
from models.generation import GenerationPreset


def caption_records(
    captioner: Captioner, records: Sequence[CaptionRecord], generation: GenerationPreset, *, batch_size: int = 16, progress: bool = True
) -> dict[str, str]:
    """One caption per distinct image (several references may share an image)."""
    images: dict[str, CaptionRecord] = {}
    for record in records:
        images.setdefault(record.image_id, record)
    transform = image_transform_for(captioner.model)
    out: dict[str, str] = {}
    ids = list(images)
    for start in tqdm(range(0, len(ids), batch_size), desc=f"captioning ({captioner.identity.name})", unit="batch", disable=not progress):
        chunk = ids[start : start + batch_size]
        inputs = [transform(load_image(images[i].image_path, color="L")) for i in chunk]
        arrays = {v.name: np.stack([x[v.name] for x in inputs]) for v in captioner.views}
        out.update(zip(chunk, captioner.caption(arrays, generation, batch_size=batch_size), strict=True))
    return out


def evaluate_checkpoints(
    model_dirs: Sequence[Path],
    records: Sequence[CaptionRecord],
    *,
    generation: GenerationPreset,
    device: str = "auto",
    batch_size: int = 16,
    out_dir: Path | None = None,
    detail_words: str | None = None,
    bertscore_model: Path | None = None,
    bleurt_model: Path | None = None,
    names: Sequence[str] | None = None,
    progress: bool = True,
    candidates: Sequence[int] = (),
) -> Any:
    """Returns the metrics report (``.results``, ``.table()``); writes markdown + JSON to ``out_dir``.

    A captioner that reranks candidates (SBG) is scored once per count in ``candidates`` (rows
    "SBG (top-2)" ...), the others once.
    """
    references = references_by_image(records)
    predictions: dict[str, dict[str, str]] = {}
    identities = {}
    for i, directory in enumerate(model_dirs):
        captioner = Captioner.load(directory, device)
        base = names[i] if names else captioner.identity.name
        if base in predictions:
            base = f"{base} ({Path(directory).name})"
        reranks = bool(getattr(captioner.model.config, "reranks", False))
        for count in candidates if reranks and candidates else (None,):
            name = base if count is None else f"{base} (top-{count})"
            settings = generation if count is None else generation.with_candidates(count)
            predictions[name] = caption_records(captioner, records, settings, batch_size=batch_size, progress=progress)
            identities[name] = captioner.describe() | {"path": str(directory), "candidates": count}
    vocabulary = None
    if detail_words == "synthetic":
        from models.synthetic import DETAIL_WORDS

        vocabulary = DETAIL_WORDS
    report = evaluate_models(
        predictions, references, detail_vocabulary=vocabulary, bertscore_model=bertscore_model, bleurt_model=bleurt_model
    )
    if detail_words == "synthetic":
        # The scene words as well: a model may get the scene right and miss the lesion, or the reverse.
        from models.caption_metrics import detail_word_scores
        from models.synthetic import GLOBAL_WORDS

        for name, preds in predictions.items():
            scores = detail_word_scores(preds, references, GLOBAL_WORDS)
            report.results[name].update({k: v for k, v in scores.items() if k.startswith("Acc-")})
    if out_dir is not None:
        report.write(
            out_dir,
            name="results",
            title="Caption evaluation",
            metadata={"models": identities, "images": len(references), "generation": generation.__dict__},
        )
        # Every caption, for error analysis and paired comparisons between models.
        (Path(out_dir) / "predictions.json").write_text(json.dumps({"references": references, "predictions": predictions}, indent=1))
    return report
