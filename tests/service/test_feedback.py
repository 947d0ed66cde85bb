"""`medcap export-feedback`: approved reports and their key images as the captioner's training table, read back
with the training data reader (both database backends)."""

from __future__ import annotations

import csv
import os
import re
from datetime import UTC, datetime

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from models.datasets import load_image, read_table
from models.model_commands import load_data, select_records
from service.feedback import TABLE, export_feedback
from service.review import Reviews
from service.schema import AuditEvent, Draft, Instance, Study
from service.users import Users
from tests.pipeline import MR, draft_study
from tests.processes import run, settings_env

EDITED = 'Edited by the radiologist: no acute intracranial abnormality, comma, and a "quote".'


@pytest.fixture
def reviews(db, clock, settings) -> Reviews:
    return Reviews(db, clock, storage=settings.storage, destinations=[], organization="General Hospital")


@pytest.fixture
def smith(db, clock):
    return Users(db, clock).add("smith", "Smith^Jane", "radiologist", "correct horse battery", "cli:test")


def identifiers(db) -> set[str]:
    """What would identify a patient or a study: patient IDs and names, study, series and instance UIDs."""
    with db.session() as s:
        found = {v for row in s.execute(select(Study.patient_id, Study.patient_name, Study.study_uid, Study.accession_number)) for v in row}
        found |= set(s.scalars(select(Instance.sop_instance_uid)))
        found |= {d.series_uid for d in s.scalars(select(Draft))}
    return {v for v in found if v and len(v) > 3}


@pytest.mark.peers
def test_an_edited_approval_becomes_training_data(db, clock, settings, reviews, smith, draft_id, tmp_path):
    view = reviews.view(draft_id)
    series_uid = view.series[0]["series_uid"]
    reviews.approve(draft_id, smith, findings={series_uid: EDITED}, impression="Normal.")

    out = tmp_path / "feedback"
    result = export_feedback(db, settings.storage, clock, out, actor="cli:test")
    assert (result.images, result.reports, result.skipped) == (3, 1, [])

    records = read_table(out / TABLE, strict=True)
    assert len(records) == 3  # one row per key image
    assert {r.caption for r in records} == {EDITED}  # the final text, not the model's
    assert all(r.split == "train" and r.source == "medcap-feedback" for r in records)
    assert len({r.image_id for r in records}) == 3
    key_images = view.series[0]["key_images"]
    for record, key in zip(records, key_images, strict=True):
        assert record.image_path.parent == out / "images" and record.image_path.suffix == ".png"
        with Image.open(record.image_path) as image:
            image.load()
            assert image.format == "PNG" and image.mode == "L"
        pixels = load_image(record.image_path, "L")
        ds = pydicom.dcmread(instance_path(db, key["sop_instance_uid"]), stop_before_pixels=True)
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.std() > 0.01  # a real slice, not a blank

    # Nothing identifying in file names or the table.
    secrets = identifiers(db)
    assert secrets
    names = [p.name for p in out.rglob("*")]
    table_text = (out / TABLE).read_text()
    for secret in secrets:
        assert not any(secret in name for name in names), secret
        assert secret not in table_text, secret
    assert all(re.fullmatch(r"r\d{6}-s\d+-k\d+\.png", p.name) for p in (out / "images").iterdir())

    # The captioner's own data loading takes it as training data.
    train = select_records(load_data([str(out / TABLE)]), "train", None)
    assert [r.caption for r in train] == [EDITED] * 3

    with db.session() as s:
        (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "feedback.exported")).all()
    assert (event.actor, event.details["images"], event.details["reports"], event.details["since"]) == ("cli:test", 3, 1, None)


def instance_path(db, sop_instance_uid: str) -> str:
    with db.session() as s:
        return s.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid))


@pytest.mark.peers
def test_only_approved_reports_since_the_date_are_exported(
    db, clock, settings, reviews, smith, draft_id, listener, assembler, captioner, tmp_path
):
    reviews.approve(draft_id, smith)  # as drafted, on 2026-01-01
    clock.advance(2 * 86400)
    mr = draft_study(db, clock, settings, listener, assembler, captioner, MR)
    reviews.reject(mr, smith, "Wrong sequence.")

    everything = read_table(export_feedback(db, settings.storage, clock, tmp_path / "all", actor="cli:test").table)
    assert {r.caption for r in everything} == {reviews.view(draft_id).series[0]["text"]}  # unedited: the draft's text, now approved
    assert len(everything) == 3  # the rejected MR draft is not training data
    later = export_feedback(db, settings.storage, clock, tmp_path / "later", actor="cli:test", since=datetime(2026, 1, 2, tzinfo=UTC))
    assert (later.images, read_table(later.table)) == (0, [])
    with (tmp_path / "later" / TABLE).open() as handle:
        assert next(csv.reader(handle))[:3] == ["image", "caption", "split"]


@pytest.mark.peers
@pytest.mark.processes
def test_export_feedback_command(db, clock, settings, reviews, smith, draft_id, tmp_path):
    series_uid = reviews.view(draft_id).series[0]["series_uid"]
    reviews.approve(draft_id, smith, findings={series_uid: EDITED})
    env = settings_env(settings)
    out = tmp_path / "export"
    result = run(["export-feedback", "--out", str(out), "--since", "2026-01-01"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"3 key image(s) from 1 approved report(s) written to {out / TABLE}"
    assert [r.caption for r in read_table(out / TABLE, strict=True)] == [EDITED] * 3

    none = run(["export-feedback", "--out", str(tmp_path / "none"), "--since", "2026-01-02"], env)
    assert none.returncode == 0 and none.stdout.startswith("0 key image(s) from 0 approved report(s)")
    bad = run(["export-feedback", "--out", str(tmp_path / "bad"), "--since", "last week"], env)
    assert bad.returncode == 1 and "medcap: --since 'last week': give a day as YYYY-MM-DD" in bad.stderr
    (tmp_path / "file").write_text("x")
    not_a_folder = run(["export-feedback", "--out", str(tmp_path / "file")], env)
    assert not_a_folder.returncode == 1 and "not a folder" in not_a_folder.stderr
    missing = run(["export-feedback"], env)
    assert missing.returncode == 2 and "--out" in missing.stderr
    with db.session() as s:
        exports = s.scalars(select(AuditEvent).where(AuditEvent.action == "feedback.exported").order_by(AuditEvent.id)).all()
    assert [(e.actor.startswith("cli:"), e.details["images"], e.details["since"]) for e in exports] == [
        (True, 3, "2026-01-01T00:00:00+00:00"),
        (True, 0, "2026-01-02T00:00:00+00:00"),
    ]


@pytest.mark.peers
def test_a_key_image_whose_file_is_gone_is_skipped_and_said(db, clock, settings, reviews, smith, draft_id, tmp_path):
    key = reviews.view(draft_id).series[0]["key_images"][0]["sop_instance_uid"]
    reviews.approve(draft_id, smith)
    os.unlink(instance_path(db, key))
    result = export_feedback(db, settings.storage, clock, tmp_path / "out", actor="cli:test")
    assert result.images == 2 and len(result.skipped) == 1 and re.match(r"r\d{6}-s1-k1: ", result.skipped[0])
    assert len(read_table(result.table, strict=True)) == 2
    assert np.isfinite(load_image(read_table(result.table)[0].image_path)).all()
