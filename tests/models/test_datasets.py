"""Dataset readers, data mixes and the torch Dataset, on small layouts built in tmp_path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from models.datasets import (
    PAPER_MIXES,
    CaptionImageDataset,
    CaptionRecord,
    DataMix,
    MissingImagesWarning,
    build_mix,
    collate_captions,
    load_image,
    parse_mix_spec,
    read_coco_captions,
    read_flickr,
    read_medicat,
    read_roco,
    read_table,
    references_by_image,
)


def _png(path: Path, value: int = 128, size: tuple[int, int] = (8, 6), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)
    return path


def _record(image_id: str = "a", split: str = "train", source: str = "s", caption: str = "a caption") -> CaptionRecord:
    return CaptionRecord(Path(f"/x/{image_id}.png"), caption, split, image_id, source)


# -- CaptionRecord -------------------------------------------------------------------------------


def test_caption_record_validates_and_names_the_field() -> None:
    record = CaptionRecord("img.png", "text", "validation", "id1", "roco")  # type: ignore[arg-type]
    assert record.image_path == Path("img.png")
    with pytest.raises(ValueError, match="CaptionRecord.split"):
        CaptionRecord(Path("a.png"), "text", "val", "id1", "roco")
    with pytest.raises(ValueError, match="CaptionRecord.caption"):
        CaptionRecord(Path("a.png"), "   ", "train", "id1", "roco")
    with pytest.raises(ValueError, match="CaptionRecord.image_id"):
        CaptionRecord(Path("a.png"), "text", "train", "", "roco")
    with pytest.raises(ValueError, match="CaptionRecord.source"):
        CaptionRecord(Path("a.png"), "text", "train", "id", "")
    with pytest.raises(TypeError, match="CaptionRecord.image_path"):
        CaptionRecord(None, "text", "train", "id", "roco")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        record.caption = "changed"  # type: ignore[misc]


def test_references_by_image_groups_in_first_seen_order() -> None:
    records = [_record("b", caption="One."), _record("a", caption="Two"), _record("b", caption="Three")]
    assert references_by_image(records) == {"b": ["One.", "Three"], "a": ["Two"]}
    assert references_by_image(records, preprocess=str.upper)["b"] == ["ONE.", "THREE"]


# -- ROCO ----------------------------------------------------------------------------------------


@pytest.fixture()
def roco_root(tmp_path: Path) -> Path:
    root = tmp_path / "roco-dataset"
    rad = root / "data" / "train" / "radiology"
    rad.mkdir(parents=True)
    (rad / "captions.txt").write_text(
        "ROCO_00001\t Axial CT of the abdomen.\nROCO_00002\t  Chest radiograph\nROCO_00003\t \nROCO_00004\t Missing image\n",
        encoding="utf-8",
    )
    (rad / "dlinks.txt").write_text(
        "ROCO_00002\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/1e/ed/PMC3970251.tar.gz -P /path/to/Dir\tfig-2.jpg\n",
        encoding="utf-8",
    )
    _png(rad / "images" / "ROCO_00001.jpg")
    _png(rad / "images" / "PMC3970251_fig-2.jpg")  # name used by fetch.py before 2022
    nonrad = root / "data" / "test" / "non-radiology"
    nonrad.mkdir(parents=True)
    (nonrad / "captions.txt").write_text("ROCO_90001\t A photograph of a hand.\n", encoding="utf-8")
    _png(nonrad / "images" / "ROCO_90001.jpg")
    return root


def test_read_roco_radiology_only_skips_missing_images_with_a_count(roco_root: Path) -> None:
    with pytest.warns(MissingImagesWarning, match="skipped 1 of 3"):
        records = read_roco(roco_root)
    assert [(r.image_id, r.caption, r.split, r.source) for r in records] == [
        ("ROCO_00001", "Axial CT of the abdomen.", "train", "roco"),
        ("ROCO_00002", "Chest radiograph", "train", "roco"),
    ]
    assert records[1].image_path.name == "PMC3970251_fig-2.jpg"


def test_read_roco_both_categories_and_data_folder_as_root(roco_root: Path) -> None:
    with pytest.warns(MissingImagesWarning):
        records = read_roco(roco_root / "data", radiology_only=False)
    assert {r.image_id: r.split for r in records}["ROCO_90001"] == "test"
    assert [r.image_id for r in read_roco(roco_root, splits=["val", "test"], radiology_only=False)] == ["ROCO_90001"]


def test_read_roco_strict_raises_and_empty_root_fails(roco_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ROCO_00004"):
        read_roco(roco_root, strict=True)
    with pytest.raises(FileNotFoundError, match="no ROCO captions"):
        read_roco(tmp_path / "empty")


# -- MedICaT -------------------------------------------------------------------------------------


def _medicat(root: Path, entries: list[dict[str, object]]) -> Path:
    release = root / "release"
    release.mkdir(parents=True)
    with (release / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl").open("w") as handle:
        for entry in entries:
            handle.write(json.dumps(entry) + "\n")
            _png(release / "figures" / f"{entry['pdf_hash']}_{entry['fig_uri']}")
    return root


MEDICAT_ENTRIES: list[dict[str, object]] = [
    {
        "pdf_hash": f"{i:040x}",
        "fig_uri": f"{i % 3}-Figure{i}-1.png",
        "s2_caption": f"Figure {i}. (A) Finding number {i}.",
        "radiology": i % 2 == 0,
    }
    for i in range(40)
]


def test_read_medicat_hash_split_is_deterministic_and_per_paper(tmp_path: Path) -> None:
    entries = [
        *MEDICAT_ENTRIES,
        {**MEDICAT_ENTRIES[0], "fig_uri": "9-Figure9-1.png", "s2_caption": "", "s2orc_caption": "Fig. 9: Same paper."},
    ]
    root = _medicat(tmp_path / "medicat", entries)
    records = read_medicat(root)
    assert records == read_medicat(root / "release")
    assert len(records) == 41
    first = records[0]
    assert first.image_id == f"{0:040x}_0-Figure0-1.png" and first.image_path.is_file() and first.source == "medicat"
    assert first.caption == "(A) Finding number 0."  # "Figure 0." label stripped
    assert records[-1].caption == "Same paper." and records[-1].split == first.split  # fallback caption, same paper → same split
    assert {r.split for r in records} == {"train", "validation", "test"}
    assert read_medicat(root, strip_figure_label=False)[0].caption.startswith("Figure 0.")
    assert all(int(r.image_id[:40], 16) % 2 == 0 for r in read_medicat(root, radiology_only=True))


def test_read_medicat_split_file_selects_and_assigns(tmp_path: Path) -> None:
    root = _medicat(tmp_path / "medicat", MEDICAT_ENTRIES[:4])
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({f"{0:040x}": "test", f"{1:040x}_1-Figure1-1.png": "val"}))
    records = read_medicat(root, split_file=split_file)
    assert [(r.image_id[:40], r.split) for r in records] == [(f"{0:040x}", "test"), (f"{1:040x}", "validation")]


def test_read_medicat_reports_a_missing_jsonl(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="s2_full_figures_oa_nonroco_combined"):
        read_medicat(tmp_path)


# -- COCO and tables -----------------------------------------------------------------------------


def test_read_coco_captions_gives_one_record_per_caption(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "000000000042.jpg")
    doc = {
        "images": [{"id": 42, "file_name": "000000000042.jpg"}, {"id": 7, "file_name": "missing.jpg"}],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "A dog."},
            {"image_id": 42, "id": 2, "caption": "A brown dog"},
            {"image_id": 7, "id": 3, "caption": "x"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    with pytest.warns(MissingImagesWarning, match="skipped 1 of 3"):
        records = read_coco_captions(tmp_path / "captions.json", tmp_path / "images", "val")
    assert references_by_image(records) == {"42": ["A dog.", "A brown dog"]}
    assert {r.split for r in records} == {"validation"} and records[0].source == "coco"
    doc["annotations"].append({"image_id": 99, "caption": "orphan"})
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="image_id 99"):
        read_coco_captions(tmp_path / "captions.json", tmp_path / "images", "train")


def test_read_table_csv_and_jsonl_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    absolute = _png(tmp_path / "elsewhere" / "b.png")
    _png(tmp_path / "data" / "img" / "a.png")
    (tmp_path / "data" / "pairs.csv").write_text(f"image,caption,split,extra\nimg/a.png,First caption,train,1\n{absolute},Second,test,2\n")
    records = read_table(tmp_path / "data" / "pairs.csv")
    assert [(r.image_path, r.image_id, r.source, r.split) for r in records] == [
        (tmp_path / "data" / "img" / "a.png", "img/a.png", "pairs", "train"),
        (absolute, str(absolute), "pairs", "test"),
    ]
    rows = [{"image": "img/a.png", "caption": "c", "split": "valid", "image_id": "A", "source": "mine"}]
    (tmp_path / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_table(tmp_path / "data" / "pairs.jsonl")[0] == CaptionRecord(
        tmp_path / "data" / "img" / "a.png", "c", "validation", "A", "mine"
    )


def test_read_table_fails_fast_on_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("image,caption,split\na.png,,train\n")
    with pytest.raises(ValueError, match=r"t.csv:2: column 'caption'"):
        read_table(tmp_path / "t.csv")
    (tmp_path / "t.csv").write_text("image,caption,split\na.png,text,holdout\n")
    with pytest.raises(ValueError, match="split must be one of"):
        read_table(tmp_path / "t.csv")
    (tmp_path / "t.txt").write_text("")
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        read_table(tmp_path / "t.txt")
    (tmp_path / "t.csv").write_text("image,caption,split\nnope.png,text,train\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_table(tmp_path / "t.csv", strict=True)


# -- Flickr8k / Flickr30k ------------------------------------------------------------------------

FLICKR_IMAGES = [f"{1000268201 + 7919 * i}_{i:010x}.jpg" for i in range(20)]


def _flickr_captions(name: str) -> list[str]:
    n = FLICKR_IMAGES.index(name)
    return [
        f"A child, number {n}, climbs the stairs .",
        f'A girl in a shirt that says "hello, world" ({n}) .',
        f'Dog {n} jumps ; it\'s a "good" dog .',
        f"A man, a woman and dog {n} , walking",
        f"Plain caption {n}",
    ]


def _flickr_tree(folder: Path, names: list[str] = FLICKR_IMAGES) -> Path:
    for i, name in enumerate(names):
        _png(folder / name, 10 * i % 256, size=(4, 3))
    return folder


def _kaggle_flickr(root: Path) -> Path:
    """Kaggle's Flickr8k/Flickr30k layout: ``captions.txt`` (quoted where needed) and ``Images/``."""
    root.mkdir(parents=True)
    with (root / "captions.txt").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for name in FLICKR_IMAGES:
            writer.writerows([name, caption] for caption in _flickr_captions(name))
    _flickr_tree(root / "Images")
    return root


def _token_lines(names: list[str]) -> str:
    return "".join(f"{name}#{k}\t{caption}\n" for name in names for k, caption in enumerate(_flickr_captions(name)))


def _original_flickr8k(root: Path) -> Path:
    """The original release: ``Flickr8k_text/`` (token file and split lists) and ``Flicker8k_Dataset/``."""
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    # the real token file also captions an image that no split list names ("2258277193_586949ec62.jpg.1")
    (text / "Flickr8k.token.txt").write_text(_token_lines(FLICKR_IMAGES) + "unlisted.jpg#0\tNot in any split.\n", encoding="utf-8")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(FLICKR_IMAGES[:14]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(FLICKR_IMAGES[14:17]) + "\n\n")
    (text / "Flickr_8k.testImages.txt").write_text("\n".join(FLICKR_IMAGES[17:]))
    _flickr_tree(root / "Flicker8k_Dataset", [*FLICKR_IMAGES, "unlisted.jpg"])
    return root


def _assert_five_references_in_one_split(records: list[CaptionRecord]) -> dict[str, str]:
    references = references_by_image(records)
    assert all(len(refs) == 5 for refs in references.values())
    splits = {r.image_id: r.split for r in records}
    assert all(r.split == splits[r.image_id] for r in records)  # no image straddles two splits
    return splits


def test_read_flickr_kaggle_captions_txt_with_hash_split(tmp_path: Path) -> None:
    root = _kaggle_flickr(tmp_path / "flickr8k")
    records = read_flickr(root)
    assert len(records) == 100
    assert references_by_image(records) == {name: _flickr_captions(name) for name in FLICKR_IMAGES}  # commas and quotes intact
    first = records[0]
    assert (first.image_id, first.image_path, first.source) == (FLICKR_IMAGES[0], root / "Images" / FLICKR_IMAGES[0], "flickr")
    splits = _assert_five_references_in_one_split(records)
    assert set(splits.values()) == {"train", "validation", "test"}
    assert records == read_flickr(root)  # the hash split is deterministic
    validation = read_flickr(root, "val", source="flickr8k")
    assert {r.split for r in validation} == {"validation"} and validation[0].source == "flickr8k"
    assert {r.image_id for r in validation} == {k for k, v in splits.items() if v == "validation"}
    assert {r.split for r in read_flickr(root, ["train", "test"])} == {"train", "test"}
    assert {r.split for r in read_flickr(root, validation_fraction=0, test_fraction=0)} == {"train"}
    with pytest.raises(ValueError, match="split must be one of"):
        read_flickr(root, "holdout")


def test_read_flickr_captions_txt_with_an_unquoted_comma_and_official_lists(tmp_path: Path) -> None:
    root = tmp_path / "flickr8k"
    _flickr_tree(root / "images", FLICKR_IMAGES[:2])
    lines = ["image,caption", f"{FLICKR_IMAGES[0]},A dog, brown and white, runs .", "", f'{FLICKR_IMAGES[1]},"Two dogs, ""playing"" ."']
    (root / "captions.txt").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    records = read_flickr(root)
    assert [(r.image_id, r.caption) for r in records] == [
        (FLICKR_IMAGES[0], "A dog, brown and white, runs ."),
        (FLICKR_IMAGES[1], 'Two dogs, "playing" .'),
    ]
    assert records[0].image_path == root / "images" / FLICKR_IMAGES[0]
    # the official Flickr8k lists override the hash split for the Kaggle layout too
    (root / "Flickr_8k.trainImages.txt").write_text(FLICKR_IMAGES[1] + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("")
    (root / "Flickr_8k.testImages.txt").write_text(FLICKR_IMAGES[0] + "\n")
    assert [(r.image_id, r.split) for r in read_flickr(root)] == [(FLICKR_IMAGES[0], "test"), (FLICKR_IMAGES[1], "train")]


def test_read_flickr_original_release_uses_the_official_split_lists(tmp_path: Path) -> None:
    root = _original_flickr8k(tmp_path / "Flickr8k")
    records = read_flickr(root, strict=True)
    assert len(records) == 100 and "unlisted.jpg" not in {r.image_id for r in records}  # listed in no split
    splits = _assert_five_references_in_one_split(records)
    assert splits == {name: "train" if i < 14 else "validation" if i < 17 else "test" for i, name in enumerate(FLICKR_IMAGES)}
    assert references_by_image(records)[FLICKR_IMAGES[3]] == _flickr_captions(FLICKR_IMAGES[3])
    assert records[0].image_path == root / "Flicker8k_Dataset" / FLICKR_IMAGES[0]
    assert [r.image_id for r in read_flickr(root, "test")] == [name for name in FLICKR_IMAGES[17:] for _ in range(5)]


def test_read_flickr_karpathy_json_maps_restval_to_train(tmp_path: Path) -> None:
    root = tmp_path / "flickr30k"
    _flickr_tree(root / "flickr30k_images" / "flickr30k_images")  # Kaggle's nested Flickr30k folders
    (root / "flickr30k_images" / "results.csv").write_text("image_name| comment_number| comment\n")  # ignored: JSON comes first
    kinds = ["train", "restval", "val", "test"]
    doc = {
        "dataset": "flickr30k",
        "images": [
            {
                "filename": name,
                "imgid": i,
                "split": kinds[i % 4],
                "sentences": [{"raw": c, "tokens": c.lower().split()} for c in _flickr_captions(name)],
            }
            for i, name in enumerate(FLICKR_IMAGES)
        ],
    }
    (root / "dataset_flickr30k.json").write_text(json.dumps(doc))
    records = read_flickr(root, source="flickr30k")
    splits = _assert_five_references_in_one_split(records)
    expected = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
    assert splits == {name: expected[kinds[i % 4]] for i, name in enumerate(FLICKR_IMAGES)}
    assert references_by_image(records)[FLICKR_IMAGES[5]] == _flickr_captions(FLICKR_IMAGES[5])
    assert records[0].image_path == root / "flickr30k_images" / "flickr30k_images" / FLICKR_IMAGES[0]
    assert len(read_flickr(root, "train")) == 50
    (root / "dataset_flickr8k.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="several Karpathy split files"):
        read_flickr(root)


def test_read_flickr_kaggle_flickr30k_results_csv(tmp_path: Path) -> None:
    root = tmp_path / "flickr-image-dataset"
    folder = root / "flickr30k_images"
    _flickr_tree(folder / "flickr30k_images", FLICKR_IMAGES[:2])
    lines = ["image_name| comment_number| comment"]
    lines += [f"{name}| {k}| {c}" for name in FLICKR_IMAGES[:2] for k, c in enumerate(_flickr_captions(name))]
    lines[-1] = f"{FLICKR_IMAGES[1]}| 4   A dog runs across the grass ."  # the Kaggle file's row without its second '|'
    (folder / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for records in (read_flickr(root), read_flickr(folder)):  # the download folder or the one holding results.csv
        references = references_by_image(records)
        assert references[FLICKR_IMAGES[0]] == _flickr_captions(FLICKR_IMAGES[0])
        assert references[FLICKR_IMAGES[1]][-1] == "A dog runs across the grass ." and len(references[FLICKR_IMAGES[1]]) == 5
        assert records[0].image_path == folder / "flickr30k_images" / FLICKR_IMAGES[0]
    (folder / "results.csv").write_text(lines[0] + "\n" + lines[1] + "\nno separators here\n")
    with pytest.raises(ValueError, match=r"results.csv:3: expected 'image_name\| comment_number\| comment'"):
        read_flickr(root)


def test_read_flickr_missing_images_are_counted_or_raised(tmp_path: Path) -> None:
    root = _kaggle_flickr(tmp_path / "flickr8k")
    (root / "Images" / FLICKR_IMAGES[2]).unlink()
    with pytest.warns(MissingImagesWarning, match="skipped 5 of 100"):
        records = read_flickr(root)
    assert len(records) == 95 and FLICKR_IMAGES[2] not in references_by_image(records)
    with pytest.raises(FileNotFoundError, match=FLICKR_IMAGES[2]):
        read_flickr(root, strict=True)
    other = tmp_path / "elsewhere"
    _flickr_tree(other)
    assert len(read_flickr(root, images_dir=other, strict=True)) == 100


def test_read_flickr_rejects_malformed_files_with_the_line(tmp_path: Path) -> None:
    root = tmp_path / "f"
    _flickr_tree(root / "Images", FLICKR_IMAGES[:1])
    captions = root / "captions.txt"
    captions.write_text("image\tcaption\n")
    with pytest.raises(ValueError, match=r"captions.txt:1: expected the header 'image,caption'"):
        read_flickr(root)
    captions.write_text(f'image,caption\n{FLICKR_IMAGES[0]},"A caption, quoted"\n\njust-an-image.jpg\n')
    with pytest.raises(ValueError, match=r"captions.txt:4: expected 'image,caption', got 'just-an-image.jpg'"):
        read_flickr(root)
    token = root / "Flickr8k.token.txt"  # preferred over captions.txt
    for bad_line in (f"{FLICKR_IMAGES[0]}#0 no tab", f"{FLICKR_IMAGES[0]}\tno caption number", f"{FLICKR_IMAGES[0]}#x\tbad number"):
        token.write_text(f"{FLICKR_IMAGES[0]}#0\tfine\n{bad_line}\n")
        with pytest.raises(ValueError, match=r"Flickr8k.token.txt:2: expected 'IMAGE.jpg#N<TAB>caption'"):
            read_flickr(root)
    token.unlink()
    captions.unlink()
    karpathy = root / "dataset_flickr8k.json"
    for images, message in (
        ([{"filename": "a.jpg", "split": "train"}], r"images\[0\]: missing field 'sentences'"),
        ([{"filename": "a.jpg", "split": "train", "sentences": []}, {"filename": "b.jpg", "split": "dev", "sentences": []}], "b.jpg.*dev"),
        ([{"filename": "a.jpg", "split": "train", "sentences": "a caption"}], "list of objects"),
    ):
        karpathy.write_text(json.dumps({"images": images}))
        with pytest.raises(ValueError, match=message):
            read_flickr(root)
    karpathy.write_text("{not json")
    with pytest.raises(ValueError, match="dataset_flickr8k.json: not valid JSON"):
        read_flickr(root)


def test_read_flickr_split_lists_and_layout_errors(tmp_path: Path) -> None:
    root = _original_flickr8k(tmp_path / "Flickr8k")
    lists = root / "Flickr8k_text"
    (lists / "Flickr_8k.testImages.txt").write_text(f"{FLICKR_IMAGES[18]}\n{FLICKR_IMAGES[3]}\n")
    with pytest.raises(ValueError, match=rf"Flickr_8k.testImages.txt:2: {FLICKR_IMAGES[3]} is also listed for train"):
        read_flickr(root)
    (lists / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"but not Flickr_8k.devImages.txt"):
        read_flickr(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Flickr captions under"):
        read_flickr(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_flickr(tmp_path / "nowhere")
    (tmp_path / "no-images" / "captions.txt").parent.mkdir()
    (tmp_path / "no-images" / "captions.txt").write_text("image,caption\na.jpg,A caption\n")
    with pytest.raises(FileNotFoundError, match="no Flickr image folder"):
        read_flickr(tmp_path / "no-images")


# -- data mixes ----------------------------------------------------------------------------------


def test_parse_mix_spec() -> None:
    assert parse_mix_spec("G") == ("G",)
    assert parse_mix_spec(" m + g ") == ("G", "M")
    assert PAPER_MIXES == {"clip": "G", "sam": "G+M"}
    for bad in ("", "G+G", "X", "G+M+"):
        with pytest.raises(ValueError, match="mix spec"):
            parse_mix_spec(bad)


def test_build_mix_selects_groups_splits_and_weights() -> None:
    coco = [_record(f"c{i}", source="coco") for i in range(4)] + [_record("cv", split="validation", source="coco")]
    roco = [_record(f"r{i}", source="roco") for i in range(10)]
    datasets = {"G": {"coco": coco}, "M": {"roco": roco}}
    assert [r.image_id for r in build_mix("G", datasets)] == ["c0", "c1", "c2", "c3"]
    assert [r.image_id for r in build_mix("G", datasets, split="validation")] == ["cv"]
    mixed = build_mix("G+M", datasets, weights={"coco": 2, "roco": 0.5}, seed=3)
    assert [r.source for r in mixed].count("coco") == 8 and [r.source for r in mixed].count("roco") == 5
    assert mixed == build_mix("G+M", datasets, weights={"coco": 2, "roco": 0.5}, seed=3)
    assert DataMix.parse("M+G").label == "G+M"
    with pytest.raises(ValueError, match="outside mix G"):
        build_mix("G", datasets, weights={"roco": 1})
    with pytest.raises(ValueError, match="unique across groups"):
        build_mix("G+M", {"G": {"x": coco}, "M": {"x": roco}})
    with pytest.raises(ValueError, match=">= 0"):
        DataMix.parse("G", {"coco": -1})
    with pytest.raises(ValueError, match="selects no dataset"):
        build_mix("M", {"G": {"coco": coco}})


# -- images and the torch Dataset ----------------------------------------------------------------


def test_load_image_gray_rgb_and_16_bit(tmp_path: Path) -> None:
    gray = load_image(_png(tmp_path / "g.png", 51), "L")
    assert gray.dtype == np.float32 and gray.shape == (6, 8) and np.allclose(gray, 0.2)
    rgb = load_image(_png(tmp_path / "c.png", 255, mode="RGB"))
    assert rgb.shape == (6, 8, 3) and rgb.max() == 1.0
    deep = np.array([[0, 1000], [65535, 32768]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert np.allclose(load_image(tmp_path / "d.png", "L"), deep / 65535.0)
    assert load_image(tmp_path / "d.png", "RGB").shape == (2, 2, 3)
    with pytest.raises(ValueError, match="color"):
        load_image(tmp_path / "d.png", "CMYK")  # type: ignore[arg-type]


def test_caption_image_dataset_and_collate_through_a_dataloader(tmp_path: Path) -> None:
    records = [CaptionRecord(_png(tmp_path / f"{i}.png", 10 * i), f"Caption (number) {i}.", "train", f"id{i}", "t") for i in range(3)]

    def transform(image: np.ndarray) -> dict[str, np.ndarray]:
        return {"pixel_values": image.transpose(2, 0, 1).copy(), "mean": np.array(image.mean(), dtype=np.float32)}

    dataset = CaptionImageDataset(records, transform)
    assert len(dataset) == 3 and dataset[1]["caption"] == "caption number 1"
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_captions)))
    assert batch["pixel_values"].shape == (2, 3, 6, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["mean"].shape == (2,) and batch["image_id"] == ["id0", "id1"]
    raw = CaptionImageDataset(records, lambda im: {"x": im}, color="L", text_processor=None)
    assert raw[2]["x"].shape == (6, 8) and raw[2]["caption"] == "Caption (number) 2."


def test_caption_image_dataset_rejects_bad_transform_output(tmp_path: Path) -> None:
    records = [CaptionRecord(_png(tmp_path / "a.png"), "c", "train", "a", "t")]
    with pytest.raises(TypeError, match="numpy array"):
        CaptionImageDataset(records, lambda im: {"x": torch.zeros(1)})[0]  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="clashes"):
        CaptionImageDataset(records, lambda im: {"caption": im})[0]
    with pytest.raises(ValueError, match="shapes differ"):
        collate_captions([{"x": np.zeros(2)}, {"x": np.zeros(3)}])
