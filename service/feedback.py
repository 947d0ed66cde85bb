"""Radiologists' approved reports as training data for the captioner (``medcap export-feedback``).

Each approved draft gives one row per key image: the slice as a PNG, rendered from the stored
DICOM with the "default" window (what a reviewer sees first), and as its caption the final,
radiologist-approved text of that image's series (edited or not). The table is the captioner's
plain-table format (``models.datasets.read_table``: ``image``, ``caption``, ``split``), so
``medcap train stage2 --model DIR --data OUT/table.csv --out DIR`` reads it as it is.

Nothing in a file name or column identifies a patient: images are named after the review's
database id (``images/r000012-s1-k2.png``), and ``study`` is the study's database id, there to
split by study (every row is written as ``train``; keep a study's rows together when holding
some out). The export is an audit event (``feedback.exported``) with its size and date filter.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from dicom_io.atomic import write_atomic
from dicom_io.render import render_png
from dicom_io.series import Series
from service import audit, csv_safe
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import Decision, Draft, Instance, Review, SeriesRecord, SRDocument
from service.storage import Storage

TABLE = "table.csv"
IMAGES = "images"
SOURCE = "medcap-feedback"
WINDOW = "default"
COLUMNS = ("image", "caption", "split", "image_id", "source", "modality", "study", "edited", "approved_at")


@dataclass(frozen=True)
class FeedbackExport:
    table: Path
    reports: int  # approved reports with at least one exported image
    images: int  # rows of the table
    skipped: list[str] = field(default_factory=list)  # key images that could not be rendered, and why


def export_feedback(
    db: Database, storage: Storage, clock: Clock, out: Path, *, actor: str, since: datetime | None = None
) -> FeedbackExport:
    """Write ``out/table.csv`` and ``out/images/*.png`` for the reports approved at or after ``since`` (all if None)."""
    out = Path(out)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    query = (
        select(Review.id, Review.findings, Review.edited, Review.decided_at, SRDocument.id, SRDocument.study_id)
        .join(SRDocument, SRDocument.id == Review.draft_sr_id)
        .where(Review.decision == Decision.APPROVED.value)
        .order_by(Review.decided_at, Review.id)
    )
    if since is not None:
        query = query.where(Review.decided_at >= since)
    with db.session() as s:
        approved = s.execute(query).all()
        drafts = {
            doc_id: s.scalars(select(Draft).where(Draft.sr_document_id == doc_id).order_by(Draft.id)).all()
            for _, _, _, _, doc_id, _ in approved
        }
        wanted = {k["sop_instance_uid"] for ds in drafts.values() for d in ds for k in d.key_images}
        instances = {
            uid: series_id
            for uid, series_id in s.execute(
                select(Instance.sop_instance_uid, Instance.series_id).where(Instance.sop_instance_uid.in_(wanted))
            )
        }
        s.expunge_all()

    loaded: dict[int, Series | None] = {}
    rows: list[dict[str, str]] = []
    skipped: list[str] = []
    reports = 0
    for review_id, findings, edited, decided_at, doc_id, study_id in approved:
        finals = {f["series_uid"]: f["final"] for f in findings or []}
        written = 0
        for s_index, draft in enumerate(drafts[doc_id], 1):
            caption = (finals.get(draft.series_uid) or draft.text).strip()
            for k_index, key in enumerate(draft.key_images, 1):
                name = f"r{review_id:06d}-s{s_index}-k{k_index}"
                series_id = instances.get(key["sop_instance_uid"])
                series = _series(db, storage, series_id, draft.series_uid, loaded) if series_id is not None else None
                if series is None:
                    skipped.append(f"{name}: the key image's DICOM file is no longer stored")
                    continue
                try:
                    png = render_png(series, key["sop_instance_uid"], frame=key.get("frame"), window=WINDOW)
                except (KeyError, ValueError, OSError) as exc:
                    skipped.append(f"{name}: {exc}")
                    continue
                write_atomic(out / IMAGES / f"{name}.png", png)
                rows.append(
                    {
                        "image": f"{IMAGES}/{name}.png",
                        "caption": caption,
                        "split": "train",
                        "image_id": name,
                        "source": SOURCE,
                        "modality": draft.modality or "",
                        "study": str(study_id),
                        "edited": "yes" if edited else "no",
                        "approved_at": decided_at.isoformat(),
                    }
                )
                written += 1
        reports += written > 0

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: csv_safe.cell(value) for key, value in row.items()} for row in rows)
    table = out / TABLE
    write_atomic(table, buffer.getvalue().encode("utf-8"))
    with db.session() as s:
        audit.record(
            s,
            clock.now(),
            actor,
            Action.FEEDBACK_EXPORTED,
            "feedback_export",
            str(table)[-128:],
            out=str(out.resolve()),
            since=since.isoformat() if since else None,
            reports=reports,
            images=len(rows),
            skipped=len(skipped),
        )
    return FeedbackExport(table, reports, len(rows), skipped)


def _series(db: Database, storage: Storage, series_id: int, series_uid: str, loaded: dict[int, Series | None]) -> Series | None:
    """The stored series (its headers read once for all its key images); None when its files are gone."""
    if series_id not in loaded:
        with db.session() as s:
            paths = list(
                s.scalars(select(Instance.path).where(Instance.series_id == series_id, Instance.captionable).order_by(Instance.path))
            )
            uid = s.scalar(select(SeriesRecord.series_uid).where(SeriesRecord.id == series_id)) or series_uid
        loaded[series_id] = next((x for x in storage.read_series(paths, skip_missing=True) if x.series_uid == uid), None)
    return loaded[series_id]
