"""The synthetic CT/MR benchmark: determinism, balance, lesion placement and caption round trips."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models.datasets import CaptionImageDataset, read_table
from models.synthetic import (
    DENSITIES,
    DETAIL_WORDS,
    MODALITIES,
    PLANES,
    REGIONS,
    SIDES,
    SIZES,
    SliceAttributes,
    caption_for,
    generate_dataset,
    image_half,
    parse_caption,
    render_slice,
    sample_attributes,
)

ALL_ATTRIBUTES = [
    SliceAttributes(m, r, p, True, side, size, density)
    for m, r, p in itertools.product(MODALITIES, REGIONS, PLANES)
    for side in SIDES[p]
    for size in SIZES
    for density in DENSITIES[m]
] + [SliceAttributes(m, r, p, False) for m, r, p in itertools.product(MODALITIES, REGIONS, PLANES)]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), 36, 6, 6, size=64, seed=7).parent


def test_same_seed_gives_byte_identical_files(dataset_dir: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", 36, 6, 6, size=64, seed=7).parent
    files = sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 48 + 2
    for name in files:
        assert (dataset_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = generate_dataset(tmp_path / "other", 4, 0, 0, size=64, seed=8).parent
    assert (other / "images" / "train-00000.png").read_bytes() != (dataset_dir / "images" / "train-00000.png").read_bytes()
    with pytest.raises(FileExistsError):
        generate_dataset(again, 1, 1, 1, size=64, seed=7)


def test_jsonl_reads_back_as_records_with_ground_truth(dataset_dir: Path) -> None:
    records = read_table(dataset_dir / "captions.jsonl")
    assert Counter(r.split for r in records) == {"train": 36, "validation": 6, "test": 6}
    assert records[0].image_id == "train-00000" and records[0].source == "synthetic"
    rows = [json.loads(line) for line in (dataset_dir / "captions.jsonl").read_text().splitlines()]
    for row in rows:
        attributes = SliceAttributes(**row["attributes"])
        assert row["caption"] == caption_for(attributes)
        assert (row["lesion"] is None) == (not attributes.lesion)
    image = CaptionImageDataset(records[:1], lambda im: {"image": im}, color="L")[0]["image"]
    assert image.shape == (64, 64) and image.dtype == np.float32 and 0 <= image.min() < image.max() <= 1


def test_attributes_are_balanced() -> None:
    attributes = sample_attributes(120, np.random.default_rng(0))
    for name, values in (("modality", MODALITIES), ("region", REGIONS), ("plane", PLANES), ("lesion", (True, False))):
        counts = Counter(getattr(a, name) for a in attributes)
        assert set(counts) == set(values) and max(counts.values()) - min(counts.values()) <= 1, (name, counts)
    lesions = [a for a in attributes if a.lesion]
    for key in (image_half, lambda a: a.size, lambda a: a.density in ("hyperdense", "hyperintense")):
        counts = Counter(key(a) for a in lesions)
        assert len(counts) == 2 and max(counts.values()) - min(counts.values()) <= 1, counts


@pytest.mark.parametrize("size", [64, 128])
def test_lesion_changes_pixels_only_on_its_side(size: int) -> None:
    for seed, attributes in enumerate(a for a in ALL_ATTRIBUTES if a.lesion):
        with_lesion = render_slice(attributes, size=size, seed=seed)
        without = render_slice(attributes.without_lesion(), size=size, seed=seed)
        changed = np.abs(with_lesion.image - without.image) > 1e-6
        columns = np.nonzero(changed.any(axis=0))[0]
        assert columns.size, attributes
        if image_half(attributes) == "left":
            assert columns.max() < size // 2, attributes
        else:
            assert columns.min() >= size // 2, attributes
        assert not (changed & (with_lesion.lesion_mask == 0)).any(), attributes
        # small relative to the image: under 0.6 % (small) or 2.5 % (large) of the slice
        assert changed.sum() / size**2 < (0.006 if attributes.size == "small" else 0.025), attributes
        inside = with_lesion.lesion_mask > 0.9
        delta = float((with_lesion.image - without.image)[inside].mean())
        bright = attributes.density in ("hyperdense", "hyperintense")
        assert (delta > 0.1) if bright else (delta < -0.1), (attributes, delta)


def test_small_and_large_radii_scale_with_size() -> None:
    attributes = SliceAttributes("ct", "head", "axial", True, "left", "small", "hyperdense")
    for size in (64, 128, 256):
        small = render_slice(attributes, size=size, seed=1).lesion_radius
        large = render_slice(SliceAttributes("ct", "head", "axial", True, "left", "large", "hyperdense"), size=size, seed=1).lesion_radius
        assert small is not None and large is not None
        assert 3 <= small * 128 / size <= 4 and 7 <= large * 128 / size <= 9


def test_modalities_differ_in_contrast() -> None:
    ct = render_slice(SliceAttributes("ct", "head", "axial", False), seed=5).image
    mr = render_slice(SliceAttributes("mr", "head", "axial", False), seed=5).image
    ring = (slice(60, 68), slice(4, 30))  # through the skull on the image left, at mid height
    assert ct[ring].max() > 0.85 and mr[ring].max() > 0.6  # CT: bright bone; MR: bright scalp fat
    assert ct[:4, :4].mean() < 0.08 and mr[:4, :4].mean() < 0.1  # dark air


@pytest.mark.parametrize("attributes", ALL_ATTRIBUTES, ids=lambda a: caption_for(a).replace(" ", "_"))
def test_captions_parse_back_to_attributes(attributes: SliceAttributes) -> None:
    caption = caption_for(attributes)
    assert parse_caption(caption) == attributes.as_dict()
    assert parse_caption(caption.upper().replace(".", "")) == attributes.as_dict()


def test_parse_caption_marks_missing_or_conflicting_fields_as_none() -> None:
    parsed = parse_caption("axial ct of the head and chest. lesion on the left and right. no focal lesion.")
    assert parsed == {"modality": "ct", "region": None, "plane": "axial", "lesion": None, "side": None, "size": None, "density": None}
    assert set(DETAIL_WORDS) == {"presence", "side", "size", "density"}


def test_attribute_validation() -> None:
    with pytest.raises(ValueError, match="side"):
        SliceAttributes("ct", "head", "sagittal", True, "left", "small", "hyperdense")
    with pytest.raises(ValueError, match="density"):
        SliceAttributes("ct", "head", "axial", True, "left", "small", "hyperintense")
    with pytest.raises(ValueError, match="None without a lesion"):
        SliceAttributes("mr", "chest", "axial", False, side="left")
    with pytest.raises(ValueError, match="modality"):
        SliceAttributes("pet", "chest", "axial", False)
