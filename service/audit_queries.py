"""The admins' questions, answered from the audit database: who did what to which study, how long
reports take, how good each model version's drafts are, and what failed.

Used by ``medcap audit``, the admin pages and ``/api/admin``. Turnaround, quality and failed work
read the SQL views of migration 0004 (documented for direct SQL use in docs/audit.md), so the
pages, the command line and an admin's own SQL give the same numbers; since migration 0008 the
draft and turnaround views read ``draft_outcomes`` (service/draft_outcomes.py), kept as drafts
and reviews are written, and the all-time statistics are the per-model views themselves. The audit search reads the
tables, written for the indexes on ``audit_events`` (newest first, by action, actor or study)
so that it stays fast with millions of events.

Percentiles are nearest-rank: the smallest value with at least p % of the values at or below it
(for an even count the median is the lower of the two middle values). Times are UTC.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    cast,
    exists,
    func,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from service import csv_safe
from service.database import Database
from service.schema import (
    AuditEvent,
    Dispatch,
    DispatchStatus,
    Job,
    JobStatus,
    Output,
    Review,
    SRDocument,
    SRKind,
    Study,
    User,
    UTCDateTime,
)

MAX_ROWS = 100_000  # the most one search (or CSV export) returns

# -- the views (migration 0004), as tables SQLAlchemy can select from; not part of the models ------

VIEWS = MetaData()


def _model() -> list[Column[Any]]:
    return [Column("model_name", String), Column("model_version", String), Column("weights_sha256", String)]


v_drafts = Table(
    "v_drafts",
    VIEWS,
    Column("draft_sr_id", BigInteger),
    Column("draft_sr_uid", String),
    Column("study_id", BigInteger),
    Column("study_uid", String),
    Column("accession_number", String),
    Column("patient_id", String),
    Column("patient_name", String),
    Column("study_version", Integer),
    *_model(),
    Column("received_at", UTCDateTime),
    Column("drafted_at", UTCDateTime),
    Column("decision", String),
    Column("decided_at", UTCDateTime),
    Column("reviewer", String),
    Column("edited", Boolean),
    Column("edit_distance", Integer),
    Column("draft_characters", Integer),
    Column("verified_sr_uid", String),
)
v_turnaround = Table(
    "v_turnaround",
    VIEWS,
    Column("study_uid", String),
    Column("accession_number", String),
    Column("patient_id", String),
    Column("study_version", Integer),
    Column("draft_sr_id", BigInteger),
    Column("draft_sr_uid", String),
    *_model(),
    Column("received_at", UTCDateTime),
    Column("drafted_at", UTCDateTime),
    Column("approved_at", UTCDateTime),
    Column("draft_seconds", Float),
    Column("approval_seconds", Float),
    Column("total_seconds", Float),
)
v_failed_work = Table(
    "v_failed_work",
    VIEWS,
    Column("kind", String),
    Column("job_id", BigInteger),
    Column("dispatch_id", BigInteger),
    Column("study_uid", String),
    Column("accession_number", String),
    Column("study_version", Integer),
    Column("sr_uid", String),
    Column("sr_kind", String),
    Column("destination", String),
    Column("attempts", Integer),
    Column("error", String),
    Column("failed_at", UTCDateTime),
)


class QueryError(ValueError):
    """A search that cannot be run as given (bad time, too long a value); the message says why."""


# -- (a) the audit trail ----------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSearch:
    """Filters combine with AND; each left None matches everything. ``until`` is exclusive."""

    study_uid: str | None = None
    accession: str | None = None
    patient: str | None = None  # patient ID (exact) or words of the patient's name (any order, any case)
    user: str | None = None  # an actor ("user:smith", "worker:gpu1", "dicom:CT1@10.0.0.5"); a bare name means "user:NAME"
    action: str | None = None  # an Action value ("draft.approved"), or a family ending in "." ("job.")
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("study_uid", "accession", "patient", "user", "action"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 128):
                raise QueryError(f"{name}: at most 128 characters")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise QueryError(f"{name}: give a time zone (or use parse_time)")
        if self.since and self.until and self.since >= self.until:
            raise QueryError("since must be before until")
        if not 1 <= self.limit <= MAX_ROWS or self.offset < 0:
            raise QueryError(f"limit must be 1-{MAX_ROWS} and offset at least 0")

    @property
    def actor(self) -> str | None:
        if not self.user:
            return None
        return self.user if ":" in self.user else f"user:{self.user}"

    def filters(self) -> dict[str, str]:
        """The filters given, as text (for the audit event that records a search)."""
        return {
            k: (v.isoformat() if isinstance(v, datetime) else str(v))
            for k, v in asdict(self).items()
            if v not in (None, "") and k not in ("limit", "offset")
        }


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    study_uid: str | None
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRow]
    more: bool  # further rows match beyond this page


def _name_words(patient: str) -> list[str]:
    return [w for w in re.split(r"[\s^,]+", patient.lower()) if w]


def _conditions(q: AuditSearch) -> list[ColumnElement[bool]]:
    e = AuditEvent
    where: list[ColumnElement[bool]] = []
    if q.study_uid:
        where.append(e.study_uid == q.study_uid.strip())
    # Accession and patient select the studies first (indexed on studies), then their events (indexed on study_uid).
    st = aliased(Study)
    if q.accession:
        where.append(e.study_uid.in_(select(st.study_uid).where(st.accession_number == q.accession.strip())))
    if q.patient:
        words = _name_words(q.patient)
        by_name = and_(*(func.lower(st.patient_name).contains(w, autoescape=True) for w in words)) if words else None
        matches = st.patient_id == q.patient.strip() if by_name is None else or_(st.patient_id == q.patient.strip(), by_name)
        where.append(e.study_uid.in_(select(st.study_uid).where(matches)))
    if q.actor:
        where.append(e.actor == q.actor.strip())
    if q.action:
        action = q.action.strip()
        where.append(e.action.startswith(action, autoescape=True) if action.endswith(".") else e.action == action)
    if q.since:
        where.append(e.at >= q.since)
    if q.until:
        where.append(e.at < q.until)
    return where


def search_audit(db: Database, q: AuditSearch) -> AuditPage:
    """Events matching ``q``, newest first, one page of ``q.limit`` from ``q.offset``."""
    e = AuditEvent
    query = (
        select(
            e.id,
            e.at,
            e.actor,
            e.action,
            e.object_type,
            e.object_id,
            e.study_uid,
            Study.accession_number,
            Study.patient_id,
            Study.patient_name,
            e.details,
        )
        .outerjoin(Study, Study.study_uid == e.study_uid)
        .where(*_conditions(q))
        .order_by(e.at.desc(), e.id.desc())
        .limit(q.limit + 1)
        .offset(q.offset)
    )
    # A Core connection, not the ORM session: an export of thousands of rows spent more time in the
    # ORM's row loading than in the database.
    with db.engine.connect() as conn:
        rows = [AuditRow(*row) for row in conn.execute(query)]
    return AuditPage(rows[: q.limit], len(rows) > q.limit)


AUDIT_CSV_COLUMNS = [f.name for f in fields(AuditRow)]


def _csv_values(row: AuditRow) -> list[Any]:
    return csv_safe.row(
        [
            row.id,
            _iso_utc(row.at),
            row.actor,
            row.action,
            row.object_type,
            row.object_id,
            row.study_uid or "",
            row.accession_number or "",
            row.patient_id or "",
            row.patient_name or "",
            json.dumps(row.details, sort_keys=True),
        ]
    )


def _iso_utc(at: datetime) -> str:
    """As PostgreSQL's export writes it (below): UTC, always with microseconds."""
    return (at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)).isoformat(timespec="microseconds")


def iter_audit_csv(rows: Iterable[AuditRow], *, chunk: int = 500) -> Iterator[str]:
    """CSV with a header row, in pieces of ``chunk`` rows: for a streamed download, which starts
    at once and never holds the whole file as one string. Cells go through ``csv_safe`` (patient
    names and AE titles come from outside: no formulas in Excel)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(AUDIT_CSV_COLUMNS)
    for n, row in enumerate(rows, 1):
        writer.writerow(_csv_values(row))
        if n % chunk == 0:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


def write_audit_csv(rows: Iterable[AuditRow], out: Any) -> int:
    """CSV with a header row (as :func:`iter_audit_csv`) to ``out``; returns the number of rows written."""
    writer = csv.writer(out)
    writer.writerow(AUDIT_CSV_COLUMNS)
    n = 0
    for row in rows:
        writer.writerow(_csv_values(row))
        n += 1
    return n


@dataclass(frozen=True)
class AuditExport:
    """A CSV export of an audit search: its pieces, how many events it holds, whether more matched."""

    rows: int
    more: bool
    chunks: list[str]


def export_audit(db: Database, q: AuditSearch) -> AuditExport:
    """The events matching ``q`` (newest first, at most ``q.limit``) as CSV (see :func:`iter_audit_csv`).

    On PostgreSQL the server writes the CSV (``COPY (SELECT ...) TO STDOUT``): building 3,400 rows
    in Python cost more than the query itself. COPY's own row count says how many events the
    export holds; only a full export asks whether more matched, in the same REPEATABLE READ
    snapshot (an export's own audit event, recorded afterwards, is never in it). The cells are those of :func:`iter_audit_csv`,
    neutralised by the same rule (``csv_safe.FORMULA_STARTS``); only the JSON of ``details`` keeps
    its stored key order, and empty cells may be quoted."""
    if db.engine.dialect.name != "postgresql":
        page = search_audit(db, q)
        return AuditExport(len(page.rows), page.more, list(iter_audit_csv(page.rows)))
    compiled = _export_select(q).compile(dialect=db.engine.dialect, compile_kwargs={"render_postcompile": True})
    with db.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY ({compiled}) TO STDOUT (FORMAT csv, HEADER)", compiled.params) as copy:
            chunks = [bytes(data).decode("utf-8") for data in copy]
        rows = int(cursor.rowcount)  # the "COPY n" command tag
        beyond = select(AuditEvent.id).where(*_conditions(q)).offset(q.offset + q.limit).limit(1)
        more = rows == q.limit and conn.execute(select(exists(beyond))).scalar_one()
        conn.rollback()  # read only
    return AuditExport(rows, bool(more), chunks)


def _export_select(q: AuditSearch) -> Any:
    e = AuditEvent
    starts = sorted(csv_safe.FORMULA_STARTS)

    def cell(column: Any, name: str) -> Any:  # csv_safe.cell, in SQL
        return case((func.left(column, 1).in_(starts), func.concat("'", column)), else_=column).label(name)

    at = func.to_char(func.timezone("UTC", e.at), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
    # A study looked up per event (OFFSET 0 keeps the lateral join a nested loop): hashing all
    # 40,000 studies for a 3,400-row export took half of the query.
    st = select(Study.accession_number, Study.patient_id, Study.patient_name).where(Study.study_uid == e.study_uid).offset(0).lateral("st")
    return (
        select(
            e.id.label("id"),
            at.label("at"),
            cell(e.actor, "actor"),
            cell(e.action, "action"),
            cell(e.object_type, "object_type"),
            cell(e.object_id, "object_id"),
            cell(e.study_uid, "study_uid"),
            cell(st.c.accession_number, "accession_number"),
            cell(st.c.patient_id, "patient_id"),
            cell(st.c.patient_name, "patient_name"),
            cell(cast(e.details, Text), "details"),
        )
        .select_from(e)
        .outerjoin(st, true())
        .where(*_conditions(q))
        .order_by(e.at.desc(), e.id.desc())
        .limit(q.limit)
        .offset(q.offset)
    )


def audit_csv(rows: Iterable[AuditRow]) -> str:
    return "".join(iter_audit_csv(rows))


def parse_time(text: str | None, *, end: bool = False) -> datetime | None:
    """An ISO date or date and time (UTC unless it names a zone). With ``end``, a date alone means
    the end of that day (so ``--until 2026-03-01`` includes the 1st)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = date.fromisoformat(text) + (timedelta(days=1) if end else timedelta())
            return datetime.combine(day, time(), tzinfo=UTC)
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"{text!r} is not a date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM[:SS][+zone])") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- (b) turnaround -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyTurnaround:
    """One study: when it was received, when its newest draft was written, when that was approved."""

    study_uid: str
    accession_number: str | None
    study_version: int
    draft_sr_uid: str
    model_name: str
    model_version: str
    weights_sha256: str
    received_at: datetime
    drafted_at: datetime
    approved_at: datetime | None
    draft_seconds: float
    approval_seconds: float | None
    total_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TurnaroundStats:
    """Per model version: received → draft, draft → approved, received → approved (seconds)."""

    model_name: str
    model_version: str
    weights_sha256: str
    studies: int
    approved: int
    draft_median_seconds: float | None
    draft_p90_seconds: float | None
    approval_median_seconds: float | None
    approval_p90_seconds: float | None
    total_median_seconds: float | None
    total_p90_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _window(table: Table, since: datetime | None, until: datetime | None, column: str) -> list[ColumnElement[bool]]:
    where = []
    if since:
        where.append(table.c[column] >= since)
    if until:
        where.append(table.c[column] < until)
    return where


def _nearest_rank(rank: Any, n: Any, value: Any, percent: int) -> Any:
    return func.max(case((rank == (percent * n + 99) // 100, value)))


def _percentile(value: Any, percent: int) -> Any:
    # PostgreSQL's percentile_disc is the same nearest-rank percentile, computed without window sorts.
    return func.percentile_disc(percent / 100).within_group(value)


# The per-model views of migration 0008, whose columns are the fields of TurnaroundStats and ModelQuality in order;
# cheap enough that they need neither the JIT switched off nor more memory (see _analytic).
_ALL_TIME = "SELECT * FROM {view} ORDER BY model_name, model_version, weights_sha256"


@contextmanager
def _analytic(db: Database) -> Iterator[Session]:
    """A session for a query over all studies: on PostgreSQL without JIT compilation (which costs
    seconds for a query of a few hundred milliseconds once the planner's estimate is large) and with
    room to sort in memory."""
    with db.session() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SET LOCAL jit = off"))
            s.execute(text("SET LOCAL work_mem = '64MB'"))
        yield s


def study_turnaround(
    db: Database, *, since: datetime | None = None, until: datetime | None = None, limit: int = 100, offset: int = 0
) -> list[StudyTurnaround]:
    """Studies received in [since, until), newest first (``v_turnaround``)."""
    t = v_turnaround
    query = (
        select(
            t.c.study_uid,
            t.c.accession_number,
            t.c.study_version,
            t.c.draft_sr_uid,
            t.c.model_name,
            t.c.model_version,
            t.c.weights_sha256,
            t.c.received_at,
            t.c.drafted_at,
            t.c.approved_at,
            t.c.draft_seconds,
            t.c.approval_seconds,
            t.c.total_seconds,
        )
        .where(*_window(t, since, until, "received_at"))
        .order_by(t.c.received_at.desc(), t.c.draft_sr_id.desc())
        .limit(limit)
        .offset(offset)
    )
    with db.session() as s:
        return [StudyTurnaround(*tuple(row)) for row in s.execute(query)]


def turnaround_by_model(db: Database, *, since: datetime | None = None, until: datetime | None = None) -> list[TurnaroundStats]:
    """Median and 90th percentile per model version of studies received in [since, until);
    without a window, ``v_turnaround_by_model`` itself (on PostgreSQL read off indexes, not sorted)."""
    if since is None and until is None:
        with db.engine.connect() as conn:
            return [TurnaroundStats(*row) for row in conn.execute(text(_ALL_TIME.format(view="v_turnaround_by_model")))]
    t = v_turnaround
    model: tuple[ColumnElement[Any], ...] = (t.c.model_name, t.c.model_version, t.c.weights_sha256)
    metrics = (t.c.draft_seconds, t.c.approval_seconds, t.c.total_seconds)
    with _analytic(db) as s:
        if s.get_bind().dialect.name == "postgresql":
            query = select(
                *model, func.count(), func.count(t.c.approval_seconds), *(_percentile(m, p) for m in metrics for p in (50, 90))
            ).where(*_window(t, since, until, "received_at"))
        else:
            ranked = (
                select(
                    *model,
                    *metrics,
                    func.row_number().over(partition_by=model, order_by=t.c.draft_seconds).label("draft_rank"),
                    func.row_number()
                    .over(partition_by=model, order_by=(t.c.approval_seconds.is_(None), t.c.approval_seconds))
                    .label("approval_rank"),
                    func.row_number()
                    .over(partition_by=model, order_by=(t.c.total_seconds.is_(None), t.c.total_seconds))
                    .label("total_rank"),
                    func.count().over(partition_by=model).label("n"),
                    func.count(t.c.approval_seconds).over(partition_by=model).label("approved_n"),
                )
                .where(*_window(t, since, until, "received_at"))
                .subquery()
            )
            r = ranked.c
            model = (r.model_name, r.model_version, r.weights_sha256)
            query = select(
                *model,
                func.count(),
                func.max(r.approved_n),
                *(
                    _nearest_rank(rank, n, value, p)
                    for rank, n, value in (
                        (r.draft_rank, r.n, r.draft_seconds),
                        (r.approval_rank, r.approved_n, r.approval_seconds),
                        (r.total_rank, r.approved_n, r.total_seconds),
                    )
                    for p in (50, 90)
                ),
            )
        return [TurnaroundStats(*row) for row in s.execute(query.group_by(*model).order_by(*model))]


# -- (c), (d) model quality -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelQuality:
    """Per model version (name, version, weights): how its drafts fared in review.

    ``approved_unchanged_rate`` is approved-as-written over all decided drafts (approved or
    rejected). Edit distances are of approved drafts, in characters, findings and impression
    together; ``normalised_edit_distance`` is the mean of edit distance / draft length."""

    model_name: str
    model_version: str
    weights_sha256: str
    drafts: int
    reviewed: int
    approved: int
    approved_unchanged: int
    rejected: int
    approved_unchanged_rate: float | None
    mean_edit_distance: float | None
    median_edit_distance: int | None
    normalised_edit_distance: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_quality(db: Database, *, since: datetime | None = None, until: datetime | None = None) -> list[ModelQuality]:
    """Drafts written in [since, until), per model version; without a window, ``v_model_quality`` itself."""
    if since is None and until is None:
        with db.engine.connect() as conn:
            return [ModelQuality(*row) for row in conn.execute(text(_ALL_TIME.format(view="v_model_quality")))]
    d = v_drafts
    with _analytic(db) as s:
        if s.get_bind().dialect.name == "postgresql":
            r = select(d).where(*_window(d, since, until, "drafted_at")).subquery().c if since or until else d.c
            median = _percentile(case((r.decision == "approved", r.edit_distance)), 50)
        else:
            model: tuple[ColumnElement[Any], ...] = (d.c.model_name, d.c.model_version, d.c.weights_sha256)
            r = (
                select(
                    *model,
                    d.c.decision,
                    d.c.edited,
                    d.c.edit_distance,
                    d.c.draft_characters,
                    func.row_number().over(partition_by=(*model, d.c.decision), order_by=d.c.edit_distance).label("edit_rank"),
                    func.count().over(partition_by=(*model, d.c.decision)).label("in_decision"),
                )
                .where(*_window(d, since, until, "drafted_at"))
                .subquery()
                .c
            )
            median = _nearest_rank(r.edit_rank, r.in_decision, case((r.decision == "approved", r.edit_distance)), 50)
        model = (r.model_name, r.model_version, r.weights_sha256)
        approved = r.decision == "approved"
        unchanged = func.sum(case((and_(approved, ~r.edited), 1), else_=0))
        query = (
            select(
                *model,
                func.count(),
                func.count(r.decision),
                func.sum(case((approved, 1), else_=0)),
                unchanged,
                func.sum(case((r.decision == "rejected", 1), else_=0)),
                (unchanged * 1.0 / func.nullif(func.count(r.decision), 0)).cast(Float),
                func.avg(case((approved, r.edit_distance * 1.0))).cast(Float),
                median,
                func.avg(case((and_(approved, r.draft_characters > 0), r.edit_distance * 1.0 / r.draft_characters))).cast(Float),
            )
            .group_by(*model)
            .order_by(*model)
        )
        return [ModelQuality(*row) for row in s.execute(query)]


# -- (e) failed work ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedWork:
    """A failed caption job (``medcap retry JOB``) or a failed dispatch of an SR (``medcap resend SR``)."""

    kind: str  # job | dispatch
    job_id: int | None
    dispatch_id: int | None
    study_uid: str
    accession_number: str | None
    study_version: int
    sr_uid: str | None
    sr_kind: str | None  # draft | verified
    destination: str | None
    attempts: int
    error: str | None
    failed_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def failed_work(db: Database, *, limit: int = 200) -> list[FailedWork]:
    """Failed jobs and dispatches, most recent failure first (``v_failed_work``)."""
    f = v_failed_work
    query = select(*f.c).order_by(f.c.failed_at.desc(), f.c.kind, f.c.job_id.desc(), f.c.dispatch_id.desc()).limit(limit)
    with db.session() as s:
        return [FailedWork(*row) for row in s.execute(query)]


def sr_destinations(db: Database, sr_uid: str) -> list[str]:
    """The destinations an SR has a dispatch to."""
    with db.session() as s:
        return list(
            s.scalars(
                select(Dispatch.destination)
                .join(Output, Output.id == Dispatch.output_id)
                .join(SRDocument, SRDocument.id == Output.report_id)
                .where(SRDocument.sop_instance_uid == sr_uid)
                .order_by(Dispatch.id)
            )
        )


# -- the overview -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Overview:
    studies: int
    draft_srs: int
    undecided_drafts: int
    approved: int
    rejected: int
    failed_jobs: int
    failed_dispatches: int
    active_users: int
    events_last_24h: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def overview(db: Database, now: datetime) -> Overview:
    """Counts for the admin's front page (indexes or small tables; the audit trail only for the last day)."""
    with db.session() as s:
        draft_srs = s.scalar(select(func.count()).select_from(SRDocument).where(SRDocument.kind == SRKind.DRAFT)) or 0
        decisions: dict[str, int] = {
            decision: n for decision, n in s.execute(select(Review.decision, func.count()).group_by(Review.decision))
        }
        return Overview(
            studies=s.scalar(select(func.count()).select_from(Study)) or 0,
            draft_srs=draft_srs,
            undecided_drafts=draft_srs - sum(decisions.values()),  # one review per draft SR at most
            approved=decisions.get("approved", 0),
            rejected=decisions.get("rejected", 0),
            failed_jobs=s.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.FAILED)) or 0,
            failed_dispatches=s.scalar(select(func.count()).select_from(Dispatch).where(Dispatch.status == DispatchStatus.FAILED)) or 0,
            active_users=s.scalar(select(func.count()).select_from(User).where(User.disabled.is_(False))) or 0,
            events_last_24h=s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.at >= now - timedelta(days=1))) or 0,
        )


# -- plain-text tables (the command line) --------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A duration for people: 45 s, 12.5 min, 3.2 h, 2.1 d."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def text_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def rows_csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(csv_safe.row(("" if v is None else v.isoformat() if isinstance(v, datetime) else v) for v in row) for row in rows)
    return out.getvalue()
