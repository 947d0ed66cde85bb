"""The radiologists' worklist: draft SRs with their review state, oldest first (or as sorted), filtered and searched;
the reading order (the next and previous draft awaiting review) and a patient's earlier reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from service.database import Database
from service.review import ReviewState, state_of
from service.schema import Draft, Instance, Review, SRDocument, SRKind, Study, StudyVersion

#: Worklist orders: longest waiting first (the reading order), newest draft first, study date (newest
#: first), patient name.
SORTS = ("waiting", "newest", "study_date", "patient")


@dataclass(frozen=True)
class WorklistFilter:
    state: ReviewState | None = ReviewState.AWAITING
    modality: str | None = None
    received_from: date | None = None  # the draft's date, inclusive
    received_to: date | None = None
    search: str | None = None  # accession number, patient ID or patient name (substring, any case)
    limit: int = 100
    offset: int = 0
    patient_id: str | None = None  # exactly this Patient ID (a patient's earlier reports)
    sort: str = "waiting"  # one of SORTS

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ValueError(f"sort {self.sort!r} is unknown; choose from {', '.join(SORTS)}")
        if self.modality is not None and (not self.modality.isalnum() or len(self.modality) > 16):
            raise ValueError(f"modality {self.modality!r} is not a DICOM modality code")
        if self.search is not None and len(self.search) > 64:
            raise ValueError("search: at most 64 characters")
        if not 1 <= self.limit <= 1000 or self.offset < 0:
            raise ValueError("limit must be 1-1000 and offset at least 0")
        if self.received_from and self.received_to and self.received_from > self.received_to:
            raise ValueError("received_from is after received_to")


@dataclass(frozen=True)
class WorklistRow:
    draft_id: int
    sop_instance_uid: str
    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_description: str | None
    study_version: int
    modalities: str
    created_at: datetime
    state: str
    study_date: str | None = None  # DICOM DA, YYYYMMDD

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _latest() -> Any:
    return select(StudyVersion.study_id, func.max(StudyVersion.number).label("latest")).group_by(StudyVersion.study_id).subquery()


def _state_condition(state: ReviewState, latest: Any) -> ColumnElement[bool]:
    if state in (ReviewState.APPROVED, ReviewState.REJECTED):
        return Review.decision == state.value
    undecided = Review.id.is_(None)
    if state is ReviewState.SUPERSEDED:
        return and_(undecided, StudyVersion.number < latest.c.latest)
    return and_(undecided, StudyVersion.number >= latest.c.latest)


def _state_of_row(latest: Any) -> ColumnElement[str]:
    """:func:`service.review.state_of` in SQL, as :func:`_state_condition` selects each state."""
    return case(
        (Review.id.is_not(None), Review.decision),
        (StudyVersion.number < latest.c.latest, ReviewState.SUPERSEDED.value),
        else_=ReviewState.AWAITING.value,
    )


def _order(sort: str) -> list[Any]:
    oldest = [SRDocument.created_at, SRDocument.id]
    if sort == "newest":
        return [SRDocument.created_at.desc(), SRDocument.id.desc()]
    if sort == "study_date":
        return [Study.study_date.desc(), *oldest]
    if sort == "patient":
        return [Study.patient_name, *oldest]
    return oldest


def list_drafts(db: Database, where: WorklistFilter) -> tuple[list[WorklistRow], dict[str, int]]:
    """The page of drafts matching ``where`` (oldest first) and the count per state under the other filters."""
    latest = _latest()
    base = (
        select(SRDocument.id)
        .join(Study, Study.id == SRDocument.study_id)
        .join(StudyVersion, StudyVersion.id == SRDocument.study_version_id)
        .join(latest, latest.c.study_id == SRDocument.study_id)
        .outerjoin(Review, Review.draft_sr_id == SRDocument.id)
        .where(SRDocument.kind == SRKind.DRAFT)
    )
    filters: list[ColumnElement[bool]] = []
    if where.modality:
        filters.append(exists().where(Draft.sr_document_id == SRDocument.id, Draft.modality == where.modality.upper()))
    if where.received_from:
        filters.append(SRDocument.created_at >= datetime.combine(where.received_from, time.min, UTC))
    if where.received_to:
        filters.append(SRDocument.created_at < datetime.combine(where.received_to + timedelta(days=1), time.min, UTC))
    if where.patient_id:
        filters.append(Study.patient_id == where.patient_id)
    if where.search:
        pattern = f"%{where.search.strip().lower()}%"
        filters.append(
            or_(
                func.lower(Study.accession_number).like(pattern),
                func.lower(Study.patient_id).like(pattern),
                func.lower(Study.patient_name).like(pattern),
            )
        )
    with db.session() as s:
        row_state = _state_of_row(latest)  # one grouped query for every state's count
        counts = {state.value: 0 for state in ReviewState}
        for value, count in s.execute(base.with_only_columns(row_state, func.count()).where(*filters).group_by(row_state)):
            counts[value] = count
        page_filters = [*filters, _state_condition(where.state, latest)] if where.state else filters
        rows = s.execute(
            base.with_only_columns(
                SRDocument.id,
                SRDocument.sop_instance_uid,
                Study.study_uid,
                Study.accession_number,
                Study.patient_id,
                Study.patient_name,
                Study.study_description,
                StudyVersion.number,
                latest.c.latest,
                Review.decision,
                SRDocument.created_at,
                Study.study_date,
            )
            .where(*page_filters)
            .order_by(*_order(where.sort))
            .limit(where.limit)
            .offset(where.offset)
        ).all()
        all_modalities: dict[int, list[str]] = {}
        ids = [r[0] for r in rows]
        for doc_id, modality in s.execute(select(Draft.sr_document_id, Draft.modality).where(Draft.sr_document_id.in_(ids))):
            if modality and modality not in all_modalities.setdefault(doc_id, []):
                all_modalities[doc_id].append(modality)
    return [
        WorklistRow(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            r[7],
            "/".join(sorted(all_modalities.get(r[0], []))),
            r[10],
            state_of(r[9], r[7], r[8]).value,
            r[11],
        )
        for r in rows
    ], counts


def reading_order(db: Database, limit: int = 1000) -> list[int]:
    """The ids of the drafts awaiting review, in the order they are read (longest waiting first)."""
    rows, _ = list_drafts(db, WorklistFilter(state=ReviewState.AWAITING, limit=limit))
    return [r.draft_id for r in rows]


def neighbours(db: Database, draft_id: int) -> tuple[int | None, int | None]:
    """The previous and next draft awaiting review around ``draft_id``.

    For a draft that is no longer awaiting review (just decided), "next" is the first awaiting draft
    drafted after it, else the oldest one left: the worklist moves on.
    """
    order = reading_order(db)
    if draft_id in order:
        i = order.index(draft_id)
        return (order[i - 1] if i > 0 else None), (order[i + 1] if i + 1 < len(order) else None)
    with db.session() as s:
        created = s.scalar(select(SRDocument.created_at).where(SRDocument.id == draft_id))
        if created is None:
            return None, (order[0] if order else None)
        after = set(
            s.scalars(
                select(SRDocument.id).where(
                    SRDocument.id.in_(order),
                    or_(SRDocument.created_at > created, and_(SRDocument.created_at == created, SRDocument.id > draft_id)),
                )
            )
        )
    later = [i for i in order if i in after]
    return None, (later[0] if later else (order[0] if order else None))


def earlier_reports(db: Database, patient_id: str | None, study_uid: str, limit: int = 20) -> list[WorklistRow]:
    """The patient's other MedCap drafts (same Patient ID, other studies), newest first, in any state."""
    if not patient_id:
        return []
    rows, _ = list_drafts(db, WorklistFilter(state=None, patient_id=patient_id, sort="newest", limit=limit))
    return [r for r in rows if r.study_uid != study_uid]


def header_paths(db: Database, study_uids: list[str]) -> dict[str, str]:
    """One stored image file per study (the first by path): where its patient and request attributes are read."""
    if not study_uids:
        return {}
    with db.session() as s:
        rows = s.execute(
            select(Study.study_uid, func.min(Instance.path))
            .join(Instance, Instance.study_id == Study.id)
            .where(Study.study_uid.in_(study_uids), Instance.captionable)
            .group_by(Study.study_uid)
        ).all()
    return {uid: path for uid, path in rows if path}
