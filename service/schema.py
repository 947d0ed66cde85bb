"""The audit database: what arrived, from whom, what became of it.

The Alembic migrations in ``migrations/versions`` create exactly these tables; a test
compares the two. Times are timezone-aware UTC on every backend.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UID = String(64)
AE = String(16)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always returns aware datetimes (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT autoincrement on PostgreSQL, INTEGER PRIMARY KEY (rowid) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class AssociationOutcome(enum.StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"
    LOST = "lost"  # still open when the listener stopped or crashed


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  # committed, not yet handed to the broker
    ENQUEUED = "enqueued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer version of the study has its own job

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUPERSEDED)


class DispatchStatus(enum.StrEnum):
    PENDING = "pending"  # committed, not yet handed to the broker
    ENQUEUED = "enqueued"
    SENDING = "sending"
    RETRYING = "retrying"  # a transient failure; sent again at next_attempt_at
    DELIVERED = "delivered"  # the PACS answered Success or Warning for the SR
    FAILED = "failed"  # refused, or out of attempts: waits for `medcap resend`


class SRKind(enum.StrEnum):
    DRAFT = "draft"  # PARTIAL / UNVERIFIED, written by a worker
    VERIFIED = "verified"  # COMPLETE / VERIFIED, written when a radiologist approves


class Role(enum.StrEnum):
    RADIOLOGIST = "radiologist"  # reviews drafts: edits, approves, rejects
    ADMIN = "admin"  # audit, failed work, users; does not sign reports


class Decision(enum.StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(AE)
    called_ae: Mapped[str] = mapped_column(AE)
    peer_address: Mapped[str] = mapped_column(String(45))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    listener: Mapped[str] = mapped_column(String(128))  # which listener process served it
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    instances_duplicate: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(16), default=AssociationOutcome.OPEN.value)
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_associations_open", "id", sqlite_where=text("ended_at IS NULL"), postgresql_where=text("ended_at IS NULL")),
    )


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    force_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SeriesRecord(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    captionable: Mapped[bool] = mapped_column(Boolean)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The study version in which this instance (or its current content) first appears;
    # NULL while it waits for the study to become stable.
    version_number: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index(
            "ix_instances_pending",
            "study_id",
            sqlite_where=text("version_number IS NULL"),
            postgresql_where=text("version_number IS NULL"),
        ),
    )


class StudyVersion(Base):
    __tablename__ = "study_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    trigger: Mapped[str] = mapped_column(String(16))  # stable | max_wait | forced
    instance_count: Mapped[int] = mapped_column(Integer)
    captionable_count: Mapped[int] = mapped_column(Integer)

    __table_args__ = (UniqueConstraint("study_id", "number"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    superseded_by_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    error: Mapped[str | None] = mapped_column(Text)
    # A queued job after a transient failure is not published before this time (backoff).
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The pipeline's milestones: model done, SR stored and committed, every destination acknowledged.
    inferred_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sr_written_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(128))
    # The running claim: which worker process holds it (host:pid) and until when (renewed while it works).
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SRDocument(Base):
    """A Structured Report MedCap wrote, kept under the data dir until it is delivered (and after)."""

    __tablename__ = "sr_documents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # SRKind
    # draft: "draft:<study version>:<weights sha256>"; verified: "verified:<draft id>". A second
    # writer for the same key (a redelivered job, a second approval) fails on this constraint.
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("sr_documents.id"))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    completion_flag: Mapped[str] = mapped_column(String(16))  # PARTIAL | COMPLETE
    verification_flag: Mapped[str] = mapped_column(String(16))  # UNVERIFIED | VERIFIED
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    created_by: Mapped[str] = mapped_column(String(128))
    # The impression the file holds, so the review page need not read the file; None for rows older
    # than migration 0007 until their first view stores it (service/review.py).
    impression: Mapped[str | None] = mapped_column(Text)


class Draft(Base):
    """The model's text for one series of a study version, with the key images it came from."""

    __tablename__ = "drafts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sr_document_id: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    key_images: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{sop_instance_uid, caption}]
    model_name: Mapped[str] = mapped_column(String(64))
    model_type: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    generation_preset: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Grounding (models/grounding.py): the series' header facts (HeaderFacts.as_dict()) the text was checked
    # against, and the model sentences removed for contradicting them, [{sentence, reasons}]. NULL: drafted
    # before grounding existed (migration 0009).
    header_facts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    removed_sentences: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (UniqueConstraint("sr_document_id", "series_uid"),)


class Output(Base):
    """One report rendered for one output kind (service/outputs): the artefact its dispatches send.

    A DICOM SR output is the report's own SR file; other kinds (an HL7 message, a FHIR resource)
    are built from the same report. One per report and kind, built once, sent to any number of
    destinations of that kind.
    """

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # an OutputKind's name, e.g. "dicom-sr"
    media_type: Mapped[str] = mapped_column(String(100))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("report_id", "kind"),)


class Dispatch(Base):
    """One output on its way to one destination of its kind."""

    __tablename__ = "dispatches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))  # as the output kind writes it, e.g. AE@host:port
    status: Mapped[str] = mapped_column(String(16), index=True)  # DispatchStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("output_id", "destination"),)


class DispatchAttempt(Base):
    """One association to one destination, and what the PACS answered for each instance."""

    __tablename__ = "dispatch_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dispatch_id: Mapped[int] = mapped_column(ForeignKey("dispatches.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))  # delivered | transient | refused
    error: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{sop_instance_uid, status, category, error}]
    worker: Mapped[str] = mapped_column(String(128))


class User(Base):
    """A local account of the web app. Passwords are argon2 hashes; nobody exists until an admin is added."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(324))  # DICOM person name, Family^Given: the SR's verifying observer
    role: Mapped[str] = mapped_column(String(16))  # Role
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WebSession(Base):
    """A signed-in browser. The cookie holds a random token; only its hash is stored."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    address: Mapped[str] = mapped_column(String(45))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Review(Base):
    """A radiologist's decision on a draft SR: one per draft (a second approval is a conflict)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    draft_sr_id: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), unique=True)
    decision: Mapped[str] = mapped_column(String(16))  # Decision
    reason: Mapped[str | None] = mapped_column(Text)  # why rejected
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    verified_sr_id: Mapped[int | None] = mapped_column(ForeignKey("sr_documents.id"))
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # [{series_uid, draft, final}]
    impression: Mapped[str | None] = mapped_column(Text)
    edited: Mapped[bool] = mapped_column(Boolean, default=False)
    edit_distance: Mapped[int] = mapped_column(Integer, default=0)  # characters changed, draft → final, all texts
    draft_characters: Mapped[int] = mapped_column(Integer, default=0)


class DraftOutcome(Base):
    """One draft SR with its study, model and review, kept by service/draft_outcomes.py in the
    transactions that write the draft and its review: what the audit views (``v_drafts`` and the
    per-model statistics) read, so that they scan one narrow table instead of joining six."""

    __tablename__ = "draft_outcomes"

    draft_sr_id: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), primary_key=True)
    draft_sr_uid: Mapped[str] = mapped_column(UID)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    study_uid: Mapped[str] = mapped_column(UID)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_version: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    drafted_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    decision: Mapped[str | None] = mapped_column(String(16))  # NULL while undecided
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reviewer: Mapped[str | None] = mapped_column(String(64))  # username
    edited: Mapped[bool | None] = mapped_column(Boolean)
    edit_distance: Mapped[int | None] = mapped_column(Integer)
    draft_characters: Mapped[int | None] = mapped_column(Integer)
    verified_sr_uid: Mapped[str | None] = mapped_column(UID)
    # v_turnaround's seconds, computed by the database with the views' own expression; approval and total once approved
    draft_seconds: Mapped[float] = mapped_column(Float)
    approval_seconds: Mapped[float | None] = mapped_column(Float)
    total_seconds: Mapped[float | None] = mapped_column(Float)
    latest: Mapped[bool] = mapped_column(Boolean)  # the study's newest draft (v_turnaround has only these)

    # Per-model percentiles are read off these indexes (a row at an offset) instead of sorting every study.
    __table_args__ = (
        Index("ix_draft_outcomes_study_id_draft_sr_id", "study_id", "draft_sr_id"),
        *(
            Index(
                f"ix_draft_outcomes_model_{column}",
                "model_name",
                "model_version",
                "weights_sha256",
                column,
                postgresql_where=text(where),
                sqlite_where=text(where),
            )
            for column, where in (
                ("draft_seconds", "latest"),
                ("approval_seconds", "latest AND approval_seconds IS NOT NULL"),
                ("total_seconds", "latest AND total_seconds IS NOT NULL"),
                ("edit_distance", "decision = 'approved' AND edit_distance IS NOT NULL"),
            )
        ),
    )


class RoutingDecision(Base):
    """What the routing rules (service/routing.py) decided for one series of a study version."""

    __tablename__ = "routing_decisions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    rule: Mapped[str] = mapped_column(String(64))  # the rule's name, or "(no rule)"
    action: Mapped[str] = mapped_column(String(16))  # caption | skip
    model: Mapped[str | None] = mapped_column(String(64))  # the model's name when captioned
    destinations: Mapped[list[str] | None] = mapped_column(JSON)  # the rule's, when captioned; NULL: the configured ones
    reason: Mapped[str] = mapped_column(Text)
    rules_source: Mapped[str] = mapped_column(String(300))  # the rule file, or "built-in default"
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("study_version_id", "series_uid"),)


class AuditEvent(Base):
    """Append-only (database triggers refuse UPDATE and DELETE)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(128))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_audit_events_object", "object_type", "object_id"),)


class DicomwebClient(Base):
    """A program allowed to STOW-RS instances to us. The bearer token is random; only its hash is stored."""

    __tablename__ = "dicomweb_clients"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(AE, unique=True)  # recorded as the calling AE of its requests
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    networks: Mapped[str] = mapped_column(Text)  # comma-separated CIDRs it may connect from
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
