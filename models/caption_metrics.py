"""Caption metrics: COCO-standard BLEU/METEOR/ROUGE-L/CIDEr, optional BERTScore/BLEURT from local
models, detail-word scores for small findings, and the side-by-side comparison table.

The COCO metrics are pycocoevalcap 1.2 (the implementation behind LAVIS and MSMedCap's numbers):
PTBTokenizer, then ``Bleu(4)``, ``Meteor``, ``Rouge`` and ``Cider`` on the tokenised text. The
tokenizer and METEOR are Java programs. METEOR's JVM takes about 8 s to load its paraphrase table,
so `CaptionScorer` starts it once and reuses it for every model and call.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.captions import match_terms, pre_caption

__all__ = [
    "COCO_METRICS",
    "CaptionScorer",
    "EvaluationReport",
    "JavaNotFoundError",
    "caption_scores",
    "comparison_table",
    "detail_word_scores",
    "evaluate_models",
    "ptb_tokenize",
    "require_java",
    "semantic_scores",
    "write_report",
]

COCO_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SEMANTIC_METRICS: tuple[str, ...] = ("BERTScore", "BLEURT")
_NO_TRUNCATION = 10**9


class JavaNotFoundError(RuntimeError):
    """pycocoevalcap's PTB tokenizer and METEOR need a Java runtime on PATH."""


def require_java() -> str:
    """Path of ``java``, or a `JavaNotFoundError` that says how to install it."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "caption metrics need Java (pycocoevalcap runs the Stanford PTB tokenizer and METEOR 1.5 as Java programs); "
            "install a runtime, e.g. `apt-get install default-jre-headless`, and make sure `java` is on PATH"
        )
    return java


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    if not references:
        raise ValueError("references is empty")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(
            f"predictions and references must cover the same image ids: {len(missing)} without a prediction "
            f"(e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})"
        )
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ValueError(f"references[{key!r}] must be a non-empty list of non-empty strings, got {refs!r}")
    for key, text in predictions.items():
        if not isinstance(text, str):
            raise TypeError(f"predictions[{key!r}] must be a string, got {type(text).__name__}")


class CaptionScorer:
    """COCO caption metrics with one long-lived METEOR process (use as a context manager).

    ``normalise`` (default) applies LAVIS `pre_caption` without truncation to predictions and
    references first, as LAVIS does for training targets; the PTB tokenizer then lowercases and
    drops punctuation as in the COCO evaluation. ``meteor=False`` skips METEOR (and its JVM).
    """

    def __init__(self, *, meteor: bool = True, normalise: bool = True) -> None:
        require_java()
        from pycocoevalcap.meteor.meteor import Meteor

        self.normalise = normalise
        self._meteor = Meteor() if meteor else None

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the METEOR JVM (pycocoevalcap's own ``__del__`` repeats this harmlessly)."""
        if self._meteor is not None:
            process, self._meteor = self._meteor.meteor_p, None
            process.stdin.close()
            process.kill()
            process.wait()

    def score(self, predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """BLEU-1..4, METEOR, ROUGE-L and CIDEr (fractions; CIDEr can exceed 1) over ``references``' ids.

        CIDEr weighs n-grams by their rarity across the references, so it is 0 on a single image.
        """
        return self.score_models({"_": predictions}, references)["_"]

    def score_models(
        self, predictions_by_model: Mapping[str, Mapping[str, str]], references: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, float]]:
        """`score` for several models on the same references, with a single tokenizer run."""
        for predictions in predictions_by_model.values():
            _check_inputs(predictions, references)
        clean = (lambda t: pre_caption(t, _NO_TRUNCATION)) if self.normalise else (lambda t: t)
        ids = list(references)
        batch: dict[tuple[int, str], list[dict[str, str]]] = {(-1, i): [{"caption": clean(r)} for r in references[i]] for i in ids}
        for m, predictions in enumerate(predictions_by_model.values()):
            batch.update({(m, i): [{"caption": clean(predictions[i])}] for i in ids})
        tokens = ptb_tokenize(batch)
        gts = {i: tokens[(-1, i)] for i in ids}
        return {name: self._coco(gts, {i: tokens[(m, i)] for i in ids}) for m, name in enumerate(predictions_by_model)}

    def _coco(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, 1)}
        if self._meteor is not None:
            scores["METEOR"] = float(self._meteor.compute_score(gts, res)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        return scores


def ptb_tokenize(captions: Mapping[Any, list[dict[str, str]]]) -> dict[Any, list[str]]:
    """pycocoevalcap's PTBTokenizer. Its temporary file goes next to its jar; when that folder is
    read-only (an installed image), run the same command on a temporary file elsewhere."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar_dir = Path(ptbtokenizer.__file__).parent
    if os.access(jar_dir, os.W_OK):
        return ptbtokenizer.PTBTokenizer().tokenize(dict(captions))
    keys = [k for k, v in captions.items() for _ in v]
    sentences = "\n".join(c["caption"].replace("\n", " ") for v in captions.values() for c in v)
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as handle:
        handle.write(sentences.encode())
    try:
        cmd = [
            "java",
            "-cp",
            ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            handle.name,
        ]
        lines = subprocess.run(cmd, cwd=jar_dir, stdout=subprocess.PIPE, check=True).stdout.decode().split("\n")
    finally:
        os.remove(handle.name)
    out: dict[Any, list[str]] = {}
    for key, line in zip(keys, lines, strict=False):
        out.setdefault(key, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS))
    return out


def caption_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *, meteor: bool = True, normalise: bool = True
) -> dict[str, float]:
    """COCO-standard BLEU-1..4, METEOR, ROUGE-L and CIDEr for one model (see `CaptionScorer`)."""
    with CaptionScorer(meteor=meteor, normalise=normalise) as scorer:
        return scorer.score(predictions, references)


# -- optional model-based metrics -----------------------------------------------------------------


def semantic_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    bertscore_model: str | Path | None = None,
    bertscore_layers: int | None = None,
    bleurt_model: str | Path | None = None,
    batch_size: int = 32,
) -> tuple[dict[str, float], list[str]]:
    """BERTScore F1 and BLEURT from local model folders, each only when its path is given.

    Returns ``(scores, notes)``; a metric without a configured path, or whose package
    (``bert-score``, ``bleurt-pytorch``) is not installed, is left out with a note saying why.
    Multiple references: BERTScore takes the best reference (its own rule), BLEURT the maximum.
    """
    _check_inputs(predictions, references)
    ids = list(references)
    candidates = [predictions[i] for i in ids]
    refs = [list(references[i]) for i in ids]
    scores: dict[str, float] = {}
    notes: list[str] = []
    if bertscore_model is None:
        notes.append("BERTScore skipped: no local model path configured")
    else:
        try:
            import bert_score
        except ImportError:
            notes.append("BERTScore unavailable: the bert-score package is not installed")
        else:
            path = _local_model(bertscore_model, "BERTScore")
            layers = bertscore_layers or int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
            _, _, f1 = bert_score.score(candidates, refs, model_type=str(path), num_layers=layers, batch_size=batch_size, device="cpu")
            scores["BERTScore"] = float(f1.mean())
            notes.append(
                f"BERTScore: F1 with {path.name} (layer {layers}), no idf or baseline rescaling; comparable only to runs with the same model"
            )
    if bleurt_model is None:
        notes.append("BLEURT skipped: no local model path configured")
    else:
        try:
            from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer
        except ImportError:
            notes.append("BLEURT unavailable: the bleurt-pytorch package is not installed")
        else:
            scores["BLEURT"] = _bleurt(
                BleurtForSequenceClassification, BleurtTokenizer, _local_model(bleurt_model, "BLEURT"), candidates, refs, batch_size
            )
            notes.append(f"BLEURT: {Path(bleurt_model).name}, maximum over references")
    return scores, notes


def _local_model(path: str | Path, metric: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{metric} model folder {folder} has no config.json (give a local Hugging Face model folder)")
    return folder


def _bleurt(model_cls: Any, tokenizer_cls: Any, path: Path, candidates: list[str], refs: list[list[str]], batch_size: int) -> float:
    import torch

    model = model_cls.from_pretrained(path).eval()
    tokenizer = tokenizer_cls.from_pretrained(path)
    pairs = [(r, c, i) for i, (c, rs) in enumerate(zip(candidates, refs, strict=True)) for r in rs]
    best = [-math.inf] * len(candidates)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            inputs = tokenizer([p[0] for p in chunk], [p[1] for p in chunk], padding="longest", truncation=True, return_tensors="pt")
            for (_, _, i), value in zip(chunk, model(**inputs).logits.flatten().tolist(), strict=True):
                best[i] = max(best[i], value)
    return sum(best) / len(best)


# -- detail words ---------------------------------------------------------------------------------


def detail_word_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    vocabulary: Mapping[str, Iterable[str]] | Iterable[str],
) -> dict[str, float]:
    """How well predictions state the detail terms (e.g. lesion presence, side, size, density).

    ``vocabulary`` maps an attribute group to its terms (words or phrases; the longest match wins,
    so "no focal lesion" is not also read as "lesion"); a flat list is one group, ``words``.
    Returns micro-averaged ``Detail-P``/``Detail-R``/``Detail-F1`` over the terms found per image
    (reference terms: the union over an image's references), ``Acc-<group>`` (the predicted terms of
    the group equal the reference's, over images whose reference states that group) and
    ``Attr-exact`` (every group right, absent groups included, over all images).
    """
    _check_inputs(predictions, references)
    groups = {g: tuple(ts) for g, ts in vocabulary.items()} if isinstance(vocabulary, Mapping) else {"words": tuple(vocabulary)}
    all_terms = [t for ts in groups.values() for t in ts]
    group_of = {t: g for g, ts in groups.items() for t in ts}
    tp = n_pred = n_ref = exact = 0
    hits = dict.fromkeys(groups, 0)
    stated = dict.fromkeys(groups, 0)
    for key, refs in references.items():
        pred_terms = set(match_terms(predictions[key], all_terms))
        ref_terms = {t for r in refs for t in match_terms(r, all_terms)}
        tp += len(pred_terms & ref_terms)
        n_pred += len(pred_terms)
        n_ref += len(ref_terms)
        all_right = True
        for group in groups:
            pred_g = {t for t in pred_terms if group_of[t] == group}
            ref_g = {t for t in ref_terms if group_of[t] == group}
            if ref_g:
                stated[group] += 1
                hits[group] += pred_g == ref_g
            all_right &= pred_g == ref_g
        exact += all_right
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    scores = {
        "Detail-P": precision,
        "Detail-R": recall,
        "Detail-F1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
    scores.update({f"Acc-{g}": hits[g] / stated[g] for g in groups if stated[g]})
    scores["Attr-exact"] = exact / len(references)
    return scores


# -- several models, tables and files ---------------------------------------------------------------


@dataclass
class EvaluationReport:
    """Scores per model (``results[model][metric]``) and notes on what was skipped or how."""

    results: dict[str, dict[str, float]]
    notes: list[str] = field(default_factory=list)

    def table(self, *, digits: int = 3) -> str:
        return comparison_table(self.results, digits=digits)

    def write(
        self, out_dir: str | Path, *, name: str = "evaluation", title: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> tuple[Path, Path]:
        return write_report(self.results, out_dir, name=name, notes=self.notes, title=title, metadata=metadata)


def evaluate_models(
    predictions_by_model: Mapping[str, Mapping[str, str]],
    references: Mapping[str, Sequence[str]],
    *,
    detail_vocabulary: Mapping[str, Iterable[str]] | Iterable[str] | None = None,
    bertscore_model: str | Path | None = None,
    bertscore_layers: int | None = None,
    bleurt_model: str | Path | None = None,
    meteor: bool = True,
    normalise: bool = True,
) -> EvaluationReport:
    """Every metric for every model on the same references: the paper's comparison, as data."""
    if not predictions_by_model:
        raise ValueError("predictions_by_model is empty")
    with CaptionScorer(meteor=meteor, normalise=normalise) as scorer:
        results = scorer.score_models(predictions_by_model, references)
    notes: list[str] = []
    if not meteor:
        notes.append("METEOR skipped (meteor=False)")
    for name, predictions in predictions_by_model.items():
        semantic, semantic_notes = semantic_scores(
            predictions, references, bertscore_model=bertscore_model, bertscore_layers=bertscore_layers, bleurt_model=bleurt_model
        )
        results[name].update(semantic)
        notes.extend(n for n in semantic_notes if n not in notes)
        if detail_vocabulary is not None:
            results[name].update(detail_word_scores(predictions, references, detail_vocabulary))
    return EvaluationReport(results, notes)


def _columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    seen = [m for scores in results.values() for m in scores]
    known = [m for m in (*COCO_METRICS, *SEMANTIC_METRICS) if m in seen]
    return known + [m for m in dict.fromkeys(seen) if m not in known]


def comparison_table(results: Mapping[str, Mapping[str, float]], *, digits: int = 3, metrics: Sequence[str] | None = None) -> str:
    """Markdown table, one row per model and one column per metric; the best of each column in
    bold (all tied bests, and only when two or more models have a value). Higher is better for
    every metric here."""
    if not results:
        raise ValueError("results is empty")
    columns = list(metrics) if metrics is not None else _columns(results)
    best = {}
    for metric in columns:
        values = [s[metric] for s in results.values() if metric in s and math.isfinite(s[metric])]
        if len(values) >= 2:
            best[metric] = round(max(values), digits)
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, scores in results.items():
        cells = []
        for metric in columns:
            if metric not in scores:
                cells.append("–")
                continue
            text = f"{scores[metric]:.{digits}f}"
            cells.append(f"**{text}**" if metric in best and round(scores[metric], digits) == best[metric] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    results: Mapping[str, Mapping[str, float]],
    out_dir: str | Path,
    *,
    name: str = "evaluation",
    notes: Sequence[str] = (),
    title: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    digits: int = 3,
) -> tuple[Path, Path]:
    """Write ``{name}.md`` (title, table, notes) and ``{name}.json`` (the same data) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(results)
    markdown = [f"# {title or 'Caption evaluation'}", "", comparison_table(results, digits=digits, metrics=columns).rstrip("\n")]
    if notes:
        markdown += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    md_path.write_text("\n".join(markdown) + "\n", encoding="utf-8")
    doc = {
        "title": title or "Caption evaluation",
        "metrics": columns,
        "results": results,
        "notes": list(notes),
        "metadata": dict(metadata or {}),
    }
    json_path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return md_path, json_path
