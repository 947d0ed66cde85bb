"""The pipeline with a vision-language model (hf-vlm) of two architectures: received DICOM, each
series' key images read together with its header facts, a grounded draft SR that names the model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_io.sr import read_algorithm, read_findings
from models import families
from models.captioner import Captioner
from models.families import ComposeRequest
from service.schema import Draft, SRDocument
from tests.models.tiny_vlms import TINY_VLMS
from tests.pipeline import CT, MR, draft_study


def compose(arch: str, root: Path) -> Path:
    source = TINY_VLMS[arch](root / f"tiny-{arch}")
    options = {"vlm": str(source), "frozen_dtype": "source", "max_images": 2, "vlm_image_size": 64, "vlm_prompt": None}
    build = families.family("hf-vlm").compose
    assert build is not None
    build(ComposeRequest("hf-vlm", root / "ckpt", options, [], "", lambda _: None))
    return root / "ckpt"


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("arch", sorted(TINY_VLMS))
def test_a_vlm_drafts_ct_and_mr_studies_into_grounded_srs_that_name_it(arch, db, listener, clock, assembler, settings, tmp_path):
    captioner = Captioner.load(compose(arch, tmp_path), "cpu")
    calls: list[list[int]] = []
    series_captions = captioner.caption_series

    def counting(series, *args, **kwargs):
        calls.append([len(views["vlm"]) for views, _ in series])
        assert all(facts.startswith("DICOM header: ") for _, facts in series)  # the header facts are in every prompt
        return series_captions(series, *args, **kwargs)

    captioner.caption_series = counting  # the real method, counted
    for files, heading in ((CT, "CT head, axial"), (MR, "MR")):
        sr_id = draft_study(db, clock, settings, listener, assembler, captioner, files)
        with db.session() as s:
            doc = s.get(SRDocument, sr_id)
            (draft,) = s.scalars(select(Draft).where(Draft.sr_document_id == sr_id)).all()
        assert (draft.model_type, draft.model_name) == ("hf-vlm", f"tiny-{arch}")
        assert draft.weights_sha256 == captioner.identity.weights_sha256 and len(draft.key_images) == 3
        assert draft.text.startswith(heading)
        sr = pydicom.dcmread(doc.path)
        algorithm = read_algorithm(sr)
        assert (algorithm.name, algorithm.weights_sha256) == (f"tiny-{arch}", captioner.identity.weights_sha256)
        assert sr.ContributingEquipmentSequence[-1].ManufacturerModelName == f"tiny-{arch}"
        assert read_findings(sr)[0].text == draft.text
        check = subprocess.run(["dciodvfy", "-new", doc.path], capture_output=True, text=True)
        assert not [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")], check.stderr
    assert calls == [[3], [3]]  # one call per study, each series' three key images together
