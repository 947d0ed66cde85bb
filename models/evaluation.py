"""``medcap evaluate``: caption a test split with several checkpoints and score them side by side.

With header facts (DICOM series, or a table whose rows carry ``header_facts``; the synthetic
benchmark's ``attributes`` count as such), each model is scored twice, as it wrote and grounded
(models/grounding.py), and the contradiction rate of both is reported: sentences that contradict
the header facts / all sentences.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dicom_io.header_facts import HeaderFacts
from models.caption_metrics import EvaluationReport, evaluate_models
from models.captioner import Captioner, summarise
from models.datasets import CaptionRecord, load_image, references_by_image
from models.features import image_transform_for
from models.generation import GenerationPreset
from models.grounding import ContradictionCount, count_contradictions, ground, sentences

GROUNDED = " (grounded)"  # suffix of a model's row scored after grounding


@dataclass
class GroundingReport:
    """Per model: the contradiction count of its drafts as written and after grounding, and what was removed."""

    unit: str  # what was drafted: "series" (DICOM) or "images" (a table)
    without: dict[str, ContradictionCount] = field(default_factory=dict)
    grounded: dict[str, ContradictionCount] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    drafted: dict[str, int] = field(default_factory=dict)  # series or images with header facts
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per model, per series: facts, drafts, removals

    def add(self, model: str, key: str, captions: Sequence[str], facts: HeaderFacts, detail: Mapping[str, Any] | None = None) -> str:
        """Count one draft of ``model`` both ways; returns the grounded body (the model's kept sentences)."""
        draft = ground(captions, facts)
        before = count_contradictions(sentences(captions), facts)
        after = count_contradictions(draft.kept, facts)
        self.without[model] = self.without.get(model, ContradictionCount()) + before
        self.grounded[model] = self.grounded.get(model, ContradictionCount()) + after
        self.removed[model] = self.removed.get(model, 0) + len(draft.removed)
        self.drafted[model] = self.drafted.get(model, 0) + 1
        if detail is not None:
            self.details.setdefault(model, []).append(
                {
                    "key": key,
                    **detail,
                    "header_facts": facts.as_dict(),
                    "draft_without_grounding": summarise(captions),
                    "draft_grounded": draft.text,
                    "removed": [r.as_dict() for r in draft.removed],
                    "contradictions": {"without_grounding": before.as_dict(), "grounded": after.as_dict()},
                }
            )
        return draft.body

    def table(self) -> str:
        def rate(count: ContradictionCount) -> str:
            if count.rate is None:
                return "0 (no sentence left)"
            return f"{100 * count.rate:.1f}% ({count.contradicting}/{count.sentences})"

        lines = [
            f"| Model | {self.unit.capitalize()} | Contradiction rate without grounding | Contradiction rate with grounding | Sentences removed |",
            "|---|---|---|---|---|",
        ]
        for model in self.without:
            lines.append(
                f"| {model} | {self.drafted[model]} | {rate(self.without[model])} | {rate(self.grounded[model])} | {self.removed[model]} |"
            )
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "models": {
                m: {
                    self.unit: self.drafted[m],
                    "without_grounding": self.without[m].as_dict(),
                    "grounded": self.grounded[m].as_dict(),
                    "removed": self.removed[m],
                }
                for m in self.without
            },
            "details": self.details,
        }

    def write(self, out_dir: Path, name: str = "contradictions") -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, js = out / f"{name}.md", out / f"{name}.json"
        md.write_text("# Contradictions with the DICOM header\n\n" + self.table(), encoding="utf-8")
        js.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
        return md, js


@dataclass
class GroundedEvaluationReport(EvaluationReport):
    """The caption metrics (models grounded beside them, as "NAME (grounded)") and the contradiction rates."""

    grounding: GroundingReport | None = None

    def table(self, *, digits: int = 3) -> str:
        metrics = super().table(digits=digits)
        return metrics if self.grounding is None else metrics + "\n" + self.grounding.table()


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
    facts = {r.image_id: _facts(r) for r in records if r.header_facts is not None}
    grounding = None
    if facts:
        grounding = GroundingReport("images")
        for name in list(predictions):
            predictions[name + GROUNDED] = {
                image: grounding.add(name, image, [caption], facts[image]) if image in facts else caption
                for image, caption in predictions[name].items()
            }
    scored = evaluate_models(
        predictions, references, detail_vocabulary=vocabulary, bertscore_model=bertscore_model, bleurt_model=bleurt_model
    )
    report = GroundedEvaluationReport(scored.results, scored.notes, grounding)
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
        if grounding is not None:
            grounding.write(Path(out_dir))
    return report


def _facts(record: CaptionRecord) -> HeaderFacts:
    try:
        return HeaderFacts.from_dict(record.header_facts or {})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"image {record.image_id}: bad header_facts: {exc}") from exc


def evaluate_dicom(
    model_dirs: Sequence[Path],
    paths: Sequence[Path],
    *,
    generation: GenerationPreset,
    device: str = "auto",
    batch_size: int = 16,
    key_slices: Any = None,
    out_dir: Path | None = None,
    names: Sequence[str] | None = None,
) -> GroundingReport:
    """Draft every CT/MR series under ``paths`` with each model, as the pipeline does, and count the
    sentences contradicting each series' header facts without and with grounding."""
    from dicom_io.header_facts import series_facts
    from dicom_io.key_slices import KeySliceSpec
    from dicom_io.model_input import prepare_series

    report = GroundingReport("series")
    for i, directory in enumerate(model_dirs):
        captioner = Captioner.load(directory, device)
        name = names[i] if names else captioner.identity.name
        if name in report.without:
            name = f"{name} ({Path(directory).name})"
        for path in paths:
            for item in prepare_series(path, views=captioner.views, key_slices=key_slices or KeySliceSpec()):
                captions = captioner.caption(dict(item.views), generation, batch_size=batch_size)
                detail = {"path": str(path), "series_uid": item.series_uid, "captions": captions}
                report.add(name, item.series_uid, captions, series_facts(item.series), detail)
        if name not in report.without:
            raise ValueError(f"no CT or MR image series under {', '.join(str(p) for p in paths)}")
    if out_dir is not None:
        report.write(out_dir)
    return report
