"""Caption datasets: readers for ROCO, MedICaT, COCO captions, Flickr8k/30k and plain tables, data
mixes, and a torch ``Dataset`` that hands Pillow-decoded arrays to a model-supplied transform.

Every reader returns ``list[CaptionRecord]`` (one record per caption, so an image with five COCO
captions gives five records). Records whose image file is missing are skipped with one
`MissingImagesWarning` that gives the count, or raise `FileNotFoundError` with ``strict=True``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from models.captions import pre_caption

__all__ = [
    "PAPER_MIXES",
    "SPLITS",
    "CaptionImageDataset",
    "CaptionRecord",
    "DataMix",
    "MissingImagesWarning",
    "build_mix",
    "collate_captions",
    "load_image",
    "normalise_split",
    "parse_mix_spec",
    "read_coco_captions",
    "read_flickr",
    "read_medicat",
    "read_roco",
    "read_table",
    "references_by_image",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


class MissingImagesWarning(UserWarning):
    """Some records were dropped because their image file does not exist."""


def normalise_split(name: str) -> str:
    """Map a split name (``val``/``valid``/``dev`` → ``validation``) to one of `SPLITS`."""
    split = _SPLIT_ALIASES.get(name.strip().lower(), name.strip().lower())
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (or val/valid/dev), got {name!r}")
    return split


@dataclass(frozen=True)
class CaptionRecord:
    """One (image, caption) pair; ``image_id`` groups the references of one image for evaluation."""

    image_path: Path
    caption: str
    split: str
    image_id: str
    source: str
    # What the image's DICOM header states (dicom_io.header_facts.HeaderFacts.as_dict()), where the table
    # carries it: ``medcap evaluate`` then also scores the grounded captions and the contradiction rate.
    header_facts: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.image_path, Path):
            if not isinstance(self.image_path, str) or not self.image_path:
                raise TypeError(f"CaptionRecord.image_path must be a Path or a non-empty str, got {self.image_path!r}")
            object.__setattr__(self, "image_path", Path(self.image_path))
        if self.split not in SPLITS:
            raise ValueError(f"CaptionRecord.split must be one of {', '.join(SPLITS)}, got {self.split!r} (image_id={self.image_id!r})")
        for name in ("caption", "image_id", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"CaptionRecord.{name} must be a non-empty string, got {value!r} (image_path={self.image_path})")


def _existing(records: Iterable[CaptionRecord], dataset: str, strict: bool) -> list[CaptionRecord]:
    """Drop records whose image is missing (one counted warning), or raise when ``strict``."""
    kept: list[CaptionRecord] = []
    missing: list[Path] = []
    for record in records:
        if record.image_path.is_file():
            kept.append(record)
        elif strict:
            raise FileNotFoundError(f"{dataset}: image for {record.image_id!r} not found: {record.image_path}")
        else:
            missing.append(record.image_path)
    if missing:
        warnings.warn(
            f"{dataset}: skipped {len(missing)} of {len(kept) + len(missing)} records whose image file is missing (first: {missing[0]})",
            MissingImagesWarning,
            stacklevel=3,
        )
    return kept


def _selected_splits(splits: Iterable[str] | None) -> tuple[str, ...]:
    return SPLITS if splits is None else tuple(normalise_split(s) for s in splits)


# -- ROCO ----------------------------------------------------------------------------------------


def read_roco(
    root: str | Path,
    *,
    radiology_only: bool = True,
    splits: Iterable[str] | None = None,
    strict: bool = False,
) -> list[CaptionRecord]:
    """Read the razorx89/roco-dataset layout.

    ``root`` is the repository (holding ``data/``) or its ``data/`` folder. Captions come from
    ``data/{split}/{radiology,non-radiology}/captions.txt`` (``ROCO_xxxxx<TAB> caption``); images
    from the sibling ``images/ROCO_xxxxx.jpg`` written by ``scripts/fetch.py`` since January 2022.
    Downloads made by the older fetch script name images ``{PMCID}_{file}`` after ``dlinks.txt``;
    those are found too. ``source`` is ``roco`` for both categories.
    """
    root = Path(root)
    data = root / "data" if (root / "data").is_dir() else root
    categories = ("radiology",) if radiology_only else ("radiology", "non-radiology")
    candidates: list[CaptionRecord] = []
    found_any = False
    for split in _selected_splits(splits):
        for category in categories:
            folder = data / split / category
            captions_file = folder / "captions.txt"
            if not captions_file.is_file():
                continue
            found_any = True
            legacy = _roco_legacy_names(folder / "dlinks.txt")
            for line_no, line in enumerate(captions_file.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                roco_id, sep, caption = line.partition("\t")
                roco_id, caption = roco_id.strip(), caption.strip()
                if not sep or not roco_id.startswith("ROCO_"):
                    raise ValueError(f"{captions_file}:{line_no}: expected 'ROCO_xxxxx<TAB>caption', got {line[:80]!r}")
                if not caption:
                    continue  # a handful of ROCO captions are empty: nothing to learn or score
                image = folder / "images" / f"{roco_id}.jpg"
                if not image.is_file() and roco_id in legacy:
                    image = folder / "images" / legacy[roco_id]
                candidates.append(CaptionRecord(image, caption, split, roco_id, "roco"))
    if not found_any:
        raise FileNotFoundError(f"no ROCO captions found under {data} (expected data/<split>/radiology/captions.txt)")
    return _existing(candidates, "ROCO", strict)


def _roco_legacy_names(dlinks: Path) -> dict[str, str]:
    """``ROCO_id → {PMCID}_{file}``: image names used by fetch.py before January 2022."""
    if not dlinks.is_file():
        return {}
    names: dict[str, str] = {}
    for line in dlinks.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        url = next((w for w in parts[1].split() if w.endswith(".tar.gz")), "")
        pmcid = url.rsplit("/", 1)[-1][: -len(".tar.gz")]
        if pmcid:
            names[parts[0].strip()] = f"{pmcid}_{parts[-1].strip()}"
    return names


# -- MedICaT -------------------------------------------------------------------------------------

MEDICAT_JSONL_NAMES: tuple[str, ...] = (
    "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl",  # name in the public release
    "s2_full_figures_oa_nonroco_combined_medcat_context.jsonl",
)
_FIGURE_LABEL = re.compile(r"^\s*(?:supplementary\s+)?fig(?:ure)?s?\.?\s*[a-z]?\d+[a-z]?\s*[.:|]?\s*", re.IGNORECASE)


def read_medicat(
    root: str | Path,
    *,
    radiology_only: bool = False,
    split_file: str | Path | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strip_figure_label: bool = True,
    strict: bool = False,
) -> list[CaptionRecord]:
    """Read the allenai/medicat release: ``release/<jsonl>`` plus ``release/figures/{pdf_hash}_{fig_uri}``.

    ``root`` is the folder holding ``release/`` or ``release/`` itself. The caption is
    ``s2_caption`` (``s2orc_caption`` when that is empty); ``image_id`` is the figure file name.

    MedICaT ships no train/validation/test split. ``split_file`` (a JSON object mapping a figure
    file name or a ``pdf_hash`` to a split) is used when given, and figures it does not list are
    left out. Otherwise the split is a deterministic hash of ``pdf_hash`` (SHA-1 → [0, 1): below
    ``test_fraction`` is test, the next ``validation_fraction`` validation), so all figures of one
    paper land in the same split.
    ``strip_figure_label`` removes a leading "Figure 3." / "Fig 2:" label, which no image shows.
    """
    jsonl = _medicat_jsonl(Path(root))
    figures = jsonl.parent / "figures"
    _check_fractions(validation_fraction, test_fraction)
    assigned = _read_split_file(Path(split_file)) if split_file is not None else None
    candidates: list[CaptionRecord] = []
    with jsonl.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            try:
                pdf_hash, fig_uri = str(entry["pdf_hash"]), str(entry["fig_uri"])
            except KeyError as exc:
                raise ValueError(f"{jsonl}:{line_no}: missing field {exc.args[0]!r}") from None
            if radiology_only and not entry.get("radiology"):
                continue
            caption = (entry.get("s2_caption") or entry.get("s2orc_caption") or "").strip()
            if strip_figure_label:
                caption = _FIGURE_LABEL.sub("", caption, count=1).strip()
            if not caption:
                continue
            image_id = f"{pdf_hash}_{fig_uri}"
            if assigned is not None:
                split = assigned.get(image_id) or assigned.get(pdf_hash)
                if split is None:
                    continue  # the split file decides which figures are used
            else:
                split = _hash_split(pdf_hash, validation_fraction, test_fraction)
            candidates.append(CaptionRecord(figures / image_id, caption, split, image_id, "medicat"))
    return _existing(candidates, "MedICaT", strict)


def _medicat_jsonl(root: Path) -> Path:
    for folder in (root, root / "release"):
        for name in MEDICAT_JSONL_NAMES:
            if (folder / name).is_file():
                return folder / name
        found = sorted(folder.glob("s2_full_figures_oa_nonroco_combined*.jsonl")) if folder.is_dir() else []
        if found:
            return found[0]
    raise FileNotFoundError(f"no MedICaT jsonl (s2_full_figures_oa_nonroco_combined*.jsonl) in {root} or {root / 'release'}")


def _read_split_file(path: Path) -> dict[str, str]:
    mapping = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a JSON object mapping figure names or pdf hashes to splits")
    return {str(key): normalise_split(str(value)) for key, value in mapping.items()}


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not 0 <= validation_fraction < 1 or not 0 <= test_fraction < 1 or validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"validation_fraction and test_fraction must be in [0, 1) with a sum below 1, got {validation_fraction}, {test_fraction}"
        )


def _hash_split(key: str, validation_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


# -- COCO captions and plain tables --------------------------------------------------------------


def read_coco_captions(
    annotations_json: str | Path,
    images_dir: str | Path,
    split: str,
    *,
    source: str = "coco",
    strict: bool = False,
) -> list[CaptionRecord]:
    """Read a COCO captions file (``images[{id, file_name}]``, ``annotations[{image_id, caption}]``).

    One record per annotation, in file order; ``image_id`` is the COCO image id as a string.
    """
    annotations_json = Path(annotations_json)
    doc = json.loads(annotations_json.read_text(encoding="utf-8"))
    try:
        files = {str(image["id"]): str(image["file_name"]) for image in doc["images"]}
        annotations = doc["annotations"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{annotations_json}: not a COCO captions file ({exc!r})") from None
    split = normalise_split(split)
    candidates: list[CaptionRecord] = []
    for i, annotation in enumerate(annotations):
        image_id = str(annotation.get("image_id"))
        if image_id not in files:
            raise ValueError(f"{annotations_json}: annotation #{i} refers to image_id {image_id} that is not in 'images'")
        caption = str(annotation.get("caption", "")).strip()
        if caption:
            candidates.append(CaptionRecord(Path(images_dir) / files[image_id], caption, split, image_id, source))
    return _existing(candidates, f"COCO captions {annotations_json.name}", strict)


def _unneutralised(text: str) -> str:
    # MedCap's CSV writers (service/csv_safe.py) prefix "'" to text starting with = + - @ ' or a
    # control character, so that spreadsheets show it as text; a caption is the text without it.
    return text[1:] if text[:1] == "'" and text[1:2] in "=+-@\t\r\n'" else text


def read_table(path: str | Path, *, source: str | None = None, strict: bool = False) -> list[CaptionRecord]:
    """Read a ``.csv`` or ``.jsonl`` with columns ``image``, ``caption``, ``split``.

    Optional columns: ``image_id`` (default: the ``image`` value) and ``source`` (default: the
    ``source`` argument, else the file's stem). Relative image paths are relative to the file's
    folder. Other columns (such as the synthetic generator's ``attributes``) are ignored.
    """
    path = Path(path)
    rows: list[tuple[int, Mapping[str, Any]]]
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [(i, row) for i, row in enumerate(csv.DictReader(handle), 2)]
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            rows = [(i, json.loads(line)) for i, line in enumerate(handle, 1) if line.strip()]
    else:
        raise ValueError(f"{path}: expected a .csv or .jsonl file")
    default_source = source or path.stem
    candidates: list[CaptionRecord] = []
    for line_no, row in rows:
        for column in ("image", "caption", "split"):
            if not row.get(column):
                raise ValueError(f"{path}:{line_no}: column {column!r} is missing or empty")
        image = Path(str(row["image"]))
        candidates.append(
            CaptionRecord(
                image_path=image if image.is_absolute() else path.parent / image,
                caption=_unneutralised(str(row["caption"])).strip(),
                split=normalise_split(str(row["split"])),
                image_id=str(row.get("image_id") or row["image"]),
                source=str(row.get("source") or default_source),
                header_facts=_header_facts(row, f"{path}:{line_no}"),
            )
        )
    return _existing(candidates, path.name, strict)


def _header_facts(row: Mapping[str, Any], where: str) -> Mapping[str, Any] | None:
    """A row's ``header_facts`` (an object, or JSON text in a CSV), or the synthetic generator's
    ``attributes`` read as the header facts such an image would have (modality, region, plane)."""
    facts = row.get("header_facts")
    if isinstance(facts, str) and facts.strip():
        try:
            facts = json.loads(facts)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: header_facts is not JSON: {exc}") from exc
    if not facts and isinstance(row.get("attributes"), Mapping):
        a = row["attributes"]
        facts = {
            "modality": str(a.get("modality", "")).upper() or None,
            "region": {"term": a["region"]} if a.get("region") else None,
            "plane": a.get("plane"),
            "sources": {k: "synthetic attributes" for k in ("modality", "region", "plane") if a.get(k)},
        }
    if not facts:
        return None
    if not isinstance(facts, Mapping):
        raise ValueError(f"{where}: header_facts must be an object, got {type(facts).__name__}")
    return facts


def references_by_image(records: Iterable[CaptionRecord], preprocess: Callable[[str], str] | None = None) -> dict[str, list[str]]:
    """Group captions by ``image_id`` (COCO-style references), in first-seen order."""
    references: dict[str, list[str]] = {}
    for record in records:
        references.setdefault(record.image_id, []).append(preprocess(record.caption) if preprocess else record.caption)
    return references


# -- Flickr8k / Flickr30k ------------------------------------------------------------------------

FLICKR_KARPATHY_FILES: tuple[str, ...] = ("dataset_flickr8k.json", "dataset_flickr30k.json")
FLICKR_TOKEN_FILES: tuple[str, ...] = ("Flickr8k.token.txt", "results_20130124.token")
FLICKR_CSV_FILES: tuple[str, ...] = ("captions.txt", "results.csv")
FLICKR8K_SPLIT_LISTS: dict[str, str] = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Folders that may hold the text files, relative to root: the original Flickr8k text zip, and
# Kaggle's Flickr30k download (flickr30k_images/results.csv next to flickr30k_images/flickr30k_images/).
_FLICKR_TEXT_DIRS: tuple[str, ...] = (".", "Flickr8k_text", "flickr30k_images")
# The nested Kaggle folder comes before its parent, which holds results.csv rather than images.
_FLICKR_IMAGE_DIRS: tuple[str, ...] = (
    "Images",
    "images",
    "Flicker8k_Dataset",  # sic: the name inside the original Flickr8k_Dataset.zip
    "Flickr8k_Dataset",
    "flickr30k_images/flickr30k_images",
    "flickr30k_images",
    "flickr30k-images",  # the original Flickr30k tarball
)
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
_RESULTS_CSV_FUSED = re.compile(r"^\s*(\d+)\s+(\S.*)$")


def read_flickr(
    root: str | Path,
    split: str | Iterable[str] | None = None,
    *,
    source: str = "flickr",
    images_dir: str | Path | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strict: bool = False,
) -> list[CaptionRecord]:
    """Read Flickr8k or Flickr30k (five captions per image) from whichever layout ``root`` holds.

    Captions, in order of preference:

    1. Karpathy's split file ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` (captions from
       ``sentences[].raw``, splits from ``split``; ``restval`` counts as train);
    2. the original ``Flickr8k.token.txt`` (``NAME.jpg#N<TAB>caption``; Flickr30k's
       ``results_20130124.token`` has the same format);
    3. Kaggle's ``captions.txt`` (CSV with header ``image,caption``) or Flickr30k's ``results.csv``
       (``image_name| comment_number| comment``).

    Text files are looked for in ``root``, ``root/Flickr8k_text`` and ``root/flickr30k_images``.
    For layouts 2 and 3 the split comes from the official lists ``Flickr_8k.{train,dev,test}Images.txt``
    when present (images they do not list are left out), else from a SHA-1 hash of the file name
    (as in `read_medicat`), so all captions of an image share a split. ``image_id`` is the file name,
    so `references_by_image` gives each image's five references. Images are looked for next to the
    captions file, then in ``root``: ``Images/``, ``images/``, ``Flicker8k_Dataset/``,
    ``flickr30k_images/`` (or ``images_dir``). ``split`` selects one split, several, or all (None).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Flickr root {root} is not a folder")
    wanted = (normalise_split(split),) if isinstance(split, str) else _selected_splits(split)
    _check_fractions(validation_fraction, test_fraction)
    text_dirs = list(dict.fromkeys(root / d for d in _FLICKR_TEXT_DIRS if (root / d).is_dir()))
    captions_file = _flickr_captions_file(root, text_dirs)
    entries: list[tuple[str, str, str]] = []  # (file name, split, caption)
    if captions_file.name in FLICKR_KARPATHY_FILES:
        entries = _karpathy_entries(captions_file)
    else:
        pairs = _flickr_token_pairs(captions_file) if captions_file.name in FLICKR_TOKEN_FILES else _flickr_csv_pairs(captions_file)
        assigned = _flickr8k_split_lists(text_dirs)
        for name, caption in pairs:
            image_split = assigned.get(name) if assigned is not None else _hash_split(name, validation_fraction, test_fraction)
            if image_split is not None:  # with the official lists, unlisted images are not in any split
                entries.append((name, image_split, caption))
    images = Path(images_dir) if images_dir is not None else _flickr_images_dir(root, captions_file.parent)
    candidates = [CaptionRecord(images / name, caption, s, name, source) for name, s, caption in entries if s in wanted]
    return _existing(candidates, f"Flickr {captions_file.name}", strict)


def _flickr_captions_file(root: Path, text_dirs: Sequence[Path]) -> Path:
    karpathy = [d / n for d in text_dirs for n in FLICKR_KARPATHY_FILES if (d / n).is_file()]
    if len(karpathy) > 1:
        raise ValueError(f"{root}: several Karpathy split files ({', '.join(map(str, karpathy))}); keep one per Flickr root")
    if karpathy:
        return karpathy[0]
    for names in (FLICKR_TOKEN_FILES, FLICKR_CSV_FILES):
        for folder in text_dirs:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
    expected = ", ".join((*FLICKR_KARPATHY_FILES, *FLICKR_TOKEN_FILES, *FLICKR_CSV_FILES))
    raise FileNotFoundError(f"no Flickr captions under {root} (looked for {expected} in {', '.join(_FLICKR_TEXT_DIRS)})")


def _flickr_images_dir(root: Path, captions_dir: Path) -> Path:
    bases = list(dict.fromkeys((captions_dir, root)))
    for base in bases:
        for name in _FLICKR_IMAGE_DIRS:
            if (base / name).is_dir():
                return base / name
    raise FileNotFoundError(f"no Flickr image folder ({', '.join(_FLICKR_IMAGE_DIRS)}) in {' or '.join(map(str, bases))}; pass images_dir")


def _karpathy_entries(path: Path) -> list[tuple[str, str, str]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: expected Karpathy's format {{'images': [{{'filename', 'split', 'sentences'}}, ...]}}")
    entries: list[tuple[str, str, str]] = []
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            raise ValueError(f"{path}: images[{i}] must be an object, got {type(image).__name__}")
        for key in ("filename", "split", "sentences"):
            if key not in image:
                raise ValueError(f"{path}: images[{i}]: missing field {key!r}")
        name, sentences = str(image["filename"]).strip(), image["sentences"]
        split = _KARPATHY_SPLITS.get(str(image["split"]))
        if not name:
            raise ValueError(f"{path}: images[{i}]: empty 'filename'")
        if split is None:
            raise ValueError(f"{path}: images[{i}] ({name}): split must be train, val, test or restval, got {image['split']!r}")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            raise ValueError(f"{path}: images[{i}] ({name}): 'sentences' must be a list of objects")
        for sentence in sentences:
            caption = str(sentence.get("raw") or " ".join(map(str, sentence.get("tokens") or ()))).strip()
            if caption:
                entries.append((name, split, caption))
    return entries


def _flickr_token_pairs(path: Path) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, number = key.strip().rpartition("#")
        if not tab or not hash_sign or not name or not number.isdigit():
            raise ValueError(f"{path}:{line_no}: expected 'IMAGE.jpg#N<TAB>caption', got {line[:80]!r}")
        if caption.strip():
            pairs.append((name, caption.strip()))
    return pairs


def _flickr_csv_pairs(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = handle.readline()
        if "|" in header:
            return _flickr_results_csv(path, header, handle)
        if [c.strip().lower() for c in next(csv.reader([header]), [])] != ["image", "caption"]:
            raise ValueError(f"{path}:1: expected the header 'image,caption', got {header.strip()[:80]!r}")
        pairs: list[tuple[str, str]] = []
        reader = csv.reader(handle)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line_no = reader.line_num + 1  # the header was read before the reader started counting
            if len(row) < 2 or not row[0].strip():
                raise ValueError(f"{path}:{line_no}: expected 'image,caption', got {','.join(row)[:80]!r}")
            # A caption with an unquoted comma splits into more cells; file names have no commas.
            caption = ",".join(row[1:]).strip()
            if caption:
                pairs.append((row[0].strip(), caption))
    return pairs


def _flickr_results_csv(path: Path, header: str, lines: Iterable[str]) -> list[tuple[str, str]]:
    """Kaggle's Flickr30k ``results.csv``: ``|``-separated and unquoted (captions keep their quotes)."""
    if [c.strip().lower() for c in header.split("|")] != ["image_name", "comment_number", "comment"]:
        raise ValueError(f"{path}:1: expected the header 'image_name| comment_number| comment', got {header.strip()[:80]!r}")
    pairs: list[tuple[str, str]] = []
    for line_no, line in enumerate(lines, 2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rstrip("\r\n").split("|", 2)]
        if len(parts) == 2:
            # One row of the Kaggle file lacks its second '|' ("2199200615.jpg| 4   A dog runs ..."): split after the number.
            fused = _RESULTS_CSV_FUSED.match(parts[1])
            parts = [parts[0], *fused.groups()] if fused else parts
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
            raise ValueError(f"{path}:{line_no}: expected 'image_name| comment_number| comment', got {line.strip()[:80]!r}")
        if parts[2]:
            pairs.append((parts[0], parts[2]))
    return pairs


def _flickr8k_split_lists(text_dirs: Sequence[Path]) -> dict[str, str] | None:
    """``file name → split`` from the official Flickr8k lists, or None when there are none."""
    found = {s: next((d / n for d in text_dirs if (d / n).is_file()), None) for s, n in FLICKR8K_SPLIT_LISTS.items()}
    if all(p is None for p in found.values()):
        return None
    missing = [FLICKR8K_SPLIT_LISTS[s] for s, p in found.items() if p is None]
    if missing:
        # A partial set would silently drop a whole split; the lists come together in Flickr8k_text.zip.
        raise FileNotFoundError(
            f"found some official Flickr8k split lists but not {', '.join(missing)} (in {', '.join(map(str, text_dirs))})"
        )
    assigned: dict[str, str] = {}
    for split, path in ((s, p) for s, p in found.items() if p is not None):
        for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if len(name.split()) != 1:
                raise ValueError(f"{path}:{line_no}: expected one image file name per line, got {line[:80]!r}")
            if assigned.setdefault(name, split) != split:
                raise ValueError(f"{path}:{line_no}: {name} is also listed for {assigned[name]}")
    return assigned


# -- data mixes (paper: CLIP Q-Former on G, SAM Q-Former on G+M) ---------------------------------

GROUPS: tuple[str, ...] = ("G", "M")
"""``G``: general-domain image-text data (e.g. COCO); ``M``: medical data (ROCO, MedICaT)."""

PAPER_MIXES: dict[str, str] = {"clip": "G", "sam": "G+M"}
"""MSMedCap's mixed-semantic recipe: the CLIP Q-Former learns from G, the SAM Q-Former from G+M."""


def parse_mix_spec(spec: str) -> tuple[str, ...]:
    """``"G"``, ``"M"``, ``"G+M"`` (any order, case, spacing) → the groups in canonical order."""
    parts = [p.strip().upper() for p in spec.split("+")]
    if not spec.strip() or any(p not in GROUPS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"mix spec must be 'G', 'M' or 'G+M', got {spec!r}")
    return tuple(g for g in GROUPS if g in parts)


@dataclass(frozen=True)
class DataMix:
    """The groups one Q-Former trains on, and a weight per named dataset.

    A weight scales that dataset's size in the mix: 1 keeps every record, 0.5 keeps a seeded
    half, 2 repeats the records twice (fractional parts are sampled without replacement).
    """

    groups: tuple[str, ...]
    weights: tuple[tuple[str, float], ...] = field(default=())

    @classmethod
    def parse(cls, spec: str, weights: Mapping[str, float] | None = None) -> DataMix:
        items = tuple(sorted((weights or {}).items()))
        for name, weight in items:
            if not weight >= 0:
                raise ValueError(f"weight for dataset {name!r} must be >= 0, got {weight}")
        return cls(parse_mix_spec(spec), items)

    @property
    def label(self) -> str:
        return "+".join(self.groups)

    def build(
        self, datasets: Mapping[str, Mapping[str, Sequence[CaptionRecord]]], *, split: str = "train", seed: int = 0
    ) -> list[CaptionRecord]:
        """Concatenate the ``split`` records of every dataset in the selected groups, weighted.

        ``datasets`` maps a group (``"G"``/``"M"``) to named datasets, e.g.
        ``{"G": {"coco": coco}, "M": {"roco": roco, "medicat": medicat}}``.
        """
        unknown_groups = set(datasets) - set(GROUPS)
        if unknown_groups:
            raise ValueError(f"datasets has unknown groups {sorted(unknown_groups)}; use 'G' and 'M'")
        names = [name for group in GROUPS for name in datasets.get(group, {})]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"dataset names must be unique across groups, repeated: {sorted(duplicates)}")
        weights = dict(self.weights)
        selected = [name for group in self.groups for name in datasets.get(group, {})]
        stray = set(weights) - set(selected)
        if stray:
            raise ValueError(f"weights given for datasets outside mix {self.label}: {sorted(stray)} (selected: {selected})")
        if not selected:
            raise ValueError(f"mix {self.label} selects no dataset (groups given: {sorted(datasets)})")
        split = normalise_split(split)
        out: list[CaptionRecord] = []
        for group in self.groups:
            for name, records in datasets.get(group, {}).items():
                pool = [r for r in records if r.split == split]
                out.extend(_weighted(pool, weights.get(name, 1.0), random.Random(f"{seed}:{name}")))
        return out


def _weighted(records: list[CaptionRecord], weight: float, rng: random.Random) -> list[CaptionRecord]:
    whole, fraction = divmod(weight, 1.0)
    out = records * int(whole)
    extra = round(fraction * len(records))
    if extra:
        picked = sorted(rng.sample(range(len(records)), extra))
        out.extend(records[i] for i in picked)
    return out


def build_mix(
    spec: str,
    datasets: Mapping[str, Mapping[str, Sequence[CaptionRecord]]],
    *,
    split: str = "train",
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[CaptionRecord]:
    """Records for one Q-Former: ``build_mix(PAPER_MIXES["sam"], {"G": {...}, "M": {...}})``."""
    return DataMix.parse(spec, weights).build(datasets, split=split, seed=seed)


# -- images and the torch Dataset ---------------------------------------------------------------

ColorMode = Literal["L", "RGB"]


def load_image(path: str | Path, color: ColorMode = "RGB") -> np.ndarray:
    """Decode an image to float32 in [0, 1]: ``(H, W)`` for ``"L"``, ``(H, W, 3)`` for ``"RGB"``.

    16-bit PNGs keep their precision (divided by 65535); 8-bit images are divided by 255. EXIF
    orientation is applied so photographs are upright.
    """
    if color not in ("L", "RGB"):
        raise ValueError(f"color must be 'L' or 'RGB', got {color!r}")
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            gray = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 65535.0
            array = gray.astype(np.float32)
            return array if color == "L" else np.repeat(array[..., None], 3, axis=2)
        if image.mode == "F":
            array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
            return array if color == "L" else np.repeat(array[..., None], 3, axis=2)
        return np.asarray(image.convert(color), dtype=np.float32) / np.float32(255.0)


class CaptionImageDataset(Dataset[dict[str, Any]]):
    """Loads each record's image and hands it to ``image_transform`` (supplied by the model side).

    An item is the transform's arrays plus ``caption`` (after ``text_processor``, LAVIS
    `pre_caption` by default) and ``image_id``.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        image_transform: Callable[[np.ndarray], dict[str, np.ndarray]],
        *,
        color: ColorMode = "RGB",
        text_processor: Callable[[str], str] | None = pre_caption,
    ) -> None:
        if color not in ("L", "RGB"):
            raise ValueError(f"color must be 'L' or 'RGB', got {color!r}")
        self.records = list(records)
        self.image_transform = image_transform
        self.color: ColorMode = color
        self.text_processor = text_processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        arrays = self.image_transform(load_image(record.image_path, self.color))
        if not isinstance(arrays, Mapping):
            raise TypeError(f"image_transform must return a dict of numpy arrays, got {type(arrays).__name__}")
        item: dict[str, Any] = {}
        for key, value in arrays.items():
            if key in ("caption", "image_id"):
                raise ValueError(f"image_transform output key {key!r} clashes with the caption fields")
            if not isinstance(value, np.ndarray):
                raise TypeError(f"image_transform output {key!r} must be a numpy array, got {type(value).__name__}")
            item[key] = value
        item["caption"] = self.text_processor(record.caption) if self.text_processor else record.caption
        item["image_id"] = record.image_id
        return item


def collate_captions(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack numpy arrays into tensors along a new batch axis; keep strings as lists."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], np.ndarray):
            shapes = {v.shape for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack {key!r}: shapes differ {sorted(shapes)}")
            batch[key] = torch.from_numpy(np.stack(values))
        else:
            batch[key] = values
    return batch
