"""A small, exactly known history in the audit database, for the views of migration 0004 and the SQL in docs/audit.md.

Two model versions, six studies (approved as written, approved with edits, rejected, a study whose
first draft was superseded by a second version, one awaiting review, one whose job failed), a
failed dispatch of a verified SR, and the audit events that go with them. Times are exact, so the
tests can check every number the views give.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import audit, draft_outcomes
from service.audit import Action
from service.database import Database
from service.schema import Dispatch, DispatchAttempt, Draft, Job, Output, Review, SRDocument, Study, StudyVersion, User

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
MODEL_A = ("msmedcap", "1.0", "a" * 64)
MODEL_B = ("msmedcap", "2.0", "b" * 64)


@dataclass(frozen=True)
class StudySpec:
    accession: str
    patient_id: str
    patient_name: str
    received: float  # seconds after T0
    # per version: (model or None for a failed job, seconds after receipt the draft is written, decision or None,
    #               seconds after the draft it is decided, edit distance, draft characters)
    versions: tuple[tuple[tuple[str, str, str] | None, float, str | None, float, int, int], ...]


STUDIES = [
    StudySpec("A1001", "PAT001", "DOE^JANE", 0, ((MODEL_A, 60, "approved", 600, 0, 100),)),
    StudySpec("A1002", "PAT002", "ROE^RICHARD", 1000, ((MODEL_A, 120, "approved", 1200, 20, 100),)),
    StudySpec("A1003", "PAT001", "DOE^JANE", 2000, ((MODEL_A, 180, "rejected", 300, 0, 0),)),
    StudySpec("A1004", "PAT003", "POE^EDGAR", 3000, ((MODEL_A, 60, None, 0, 0, 0), (MODEL_B, 240, "approved", 60, 5, 50))),
    StudySpec("A1005", "PAT004", "LOE^ANNA", 4000, ((MODEL_B, 90, None, 0, 0, 0),)),
    StudySpec("A1006", "PAT005", "MOE^IVAN", 5000, ((None, 30, None, 0, 0, 0),)),
]


def sr_output(s: Session, report_id: int) -> int:
    """The report's DICOM SR output (what a dispatch sends), as service/outputs builds it."""
    doc = s.get(SRDocument, report_id)
    assert doc is not None
    output = Output(
        report_id=report_id, kind="dicom-sr", media_type="application/dicom", path=doc.path, sha256=doc.sha256, created_at=doc.created_at
    )
    s.add(output)
    s.flush()
    return output.id


def study_uid(accession: str) -> str:
    return f"1.2.826.0.1.3680043.8.498.{accession[1:]}"


def populate(db: Database, *, outcomes: bool = True) -> dict[str, int]:
    """Writes the history; returns ids by name (``failed_job``, ``failed_dispatch``, ``verified:A1001`` ...).
    ``outcomes=False`` leaves out the draft outcome rows, as in a database from before migration 0008."""
    ids: dict[str, int] = {}
    with db.session() as s:
        users = {}
        for name in ("smith", "jones"):  # reused where the test made them already
            user = s.scalar(select(User).where(User.username == name))
            if user is None:
                user = User(
                    username=name,
                    display_name=f"{name.title()}^Jane",
                    role="radiologist",
                    password_hash="x",
                    disabled=False,
                    created_at=T0 - timedelta(days=30),
                    password_changed_at=T0 - timedelta(days=30),
                )
                s.add(user)
                s.flush()
            users[name] = user.id
        for spec in STUDIES:
            uid = study_uid(spec.accession)
            received = T0 + timedelta(seconds=spec.received)
            study = Study(
                study_uid=uid,
                patient_id=spec.patient_id,
                patient_name=spec.patient_name,
                accession_number=spec.accession,
                study_date="20260105",
                study_description="CT HEAD",
                first_received_at=received,
            )
            s.add(study)
            s.flush()
            audit.record(s, received, "dicom:CT1@10.0.0.5", Action.STUDY_RECEIVING, "study", uid, study_uid=uid, calling_ae="CT1")
            for number, (model, after, decision, decide_after, distance, characters) in enumerate(spec.versions, 1):
                drafted = received + timedelta(seconds=after)
                version = StudyVersion(
                    study_id=study.id,
                    number=number,
                    created_at=received + timedelta(seconds=5),
                    trigger="stable",
                    instance_count=10,
                    captionable_count=10,
                )
                s.add(version)
                s.flush()
                job = Job(
                    study_version_id=version.id,
                    status="succeeded" if model else "failed",
                    created_at=version.created_at,
                    finished_at=drafted,
                    attempts=1 if model else 3,
                    error=None if model else "PermanentJobError: unreadable pixel data",
                    worker="worker:gpu1",
                )
                s.add(job)
                s.flush()
                audit.record(s, version.created_at, "system:assembler", Action.JOB_CREATED, "job", job.id, study_uid=uid)
                if model is None:
                    audit.record(s, drafted, "worker:gpu1", Action.JOB_FAILED, "job", job.id, study_uid=uid, error=job.error)
                    ids["failed_job"] = job.id
                    continue
                audit.record(s, drafted, "worker:gpu1", Action.JOB_SUCCEEDED, "job", job.id, study_uid=uid)
                doc = SRDocument(
                    kind="draft",
                    idempotency_key=f"draft:{version.id}:{model[2]}",
                    study_id=study.id,
                    study_version_id=version.id,
                    job_id=job.id,
                    sop_instance_uid=f"{uid}.{number}.1",
                    series_uid=f"{uid}.{number}.99",
                    completion_flag="PARTIAL",
                    verification_flag="UNVERIFIED",
                    path="/nonexistent",
                    sha256="0" * 64,
                    created_at=drafted,
                    created_by="worker:gpu1",
                )
                s.add(doc)
                s.flush()
                ids[f"draft:{spec.accession}:{number}"] = doc.id
                for series in (1, 2):  # two series, one model: the views count the SR once
                    s.add(
                        Draft(
                            sr_document_id=doc.id,
                            job_id=job.id,
                            series_uid=f"{uid}.{number}.{series}",
                            modality="CT",
                            text="No acute findings.",
                            key_images=[],
                            model_name=model[0],
                            model_type="msmedcap",
                            model_version=model[1],
                            weights_sha256=model[2],
                            generation_preset="fast",
                            created_at=drafted,
                        )
                    )
                audit.record(
                    s, drafted, "worker:gpu1", Action.SR_WRITTEN, "sr_document", doc.sop_instance_uid, study_uid=uid, model=model[0]
                )
                if decision is None:
                    continue
                decided = drafted + timedelta(seconds=decide_after)
                verified_id = None
                if decision == "approved":
                    verified = SRDocument(
                        kind="verified",
                        idempotency_key=f"verified:{doc.id}",
                        study_id=study.id,
                        study_version_id=version.id,
                        predecessor_id=doc.id,
                        sop_instance_uid=f"{uid}.{number}.2",
                        series_uid=f"{uid}.{number}.98",
                        completion_flag="COMPLETE",
                        verification_flag="VERIFIED",
                        path="/nonexistent",
                        sha256="1" * 64,
                        created_at=decided,
                        created_by="user:smith",
                    )
                    s.add(verified)
                    s.flush()
                    verified_id = verified.id
                    ids[f"verified:{spec.accession}"] = verified.id
                s.add(
                    Review(
                        draft_sr_id=doc.id,
                        decision=decision,
                        reason="wrong side" if decision == "rejected" else None,
                        reviewer_id=users["smith"],
                        decided_at=decided,
                        verified_sr_id=verified_id,
                        findings=[],
                        impression="Normal.",
                        edited=distance > 0,
                        edit_distance=distance,
                        draft_characters=characters,
                    )
                )
                action = Action.DRAFT_APPROVED if decision == "approved" else Action.DRAFT_REJECTED
                audit.record(
                    s,
                    decided,
                    "user:smith",
                    action,
                    "sr_document",
                    doc.sop_instance_uid,
                    study_uid=uid,
                    edited=distance > 0,
                    edit_distance=distance,
                    address="10.0.0.7",
                )
        # The verified SR of A1001 was refused by the PACS.
        failed_at = T0 + timedelta(seconds=700)
        dispatch = Dispatch(
            output_id=sr_output(s, ids["verified:A1001"]),
            destination="PACS@10.0.0.9:104",
            status="failed",
            attempts=1,
            created_at=T0 + timedelta(seconds=660),
            error="refused: 0xA700 out of resources",
        )
        s.add(dispatch)
        s.flush()
        s.add(
            DispatchAttempt(
                dispatch_id=dispatch.id,
                number=1,
                started_at=failed_at - timedelta(seconds=1),
                finished_at=failed_at,
                outcome="refused",
                error=dispatch.error,
                instances=[],
                worker="worker:gpu1",
            )
        )
        audit.record(
            s, failed_at, "worker:gpu1", Action.DISPATCH_FAILED, "dispatch", dispatch.id, study_uid=study_uid("A1001"), error=dispatch.error
        )
        ids["failed_dispatch"] = dispatch.id
        for name, draft_id in list(ids.items()):
            if outcomes and name.startswith("draft:"):
                draft_outcomes.refresh(s, draft_id)  # as drafting and review do
        # A delivered one, which is not failed work.
        s.add(
            Dispatch(
                output_id=sr_output(s, ids["verified:A1002"]),
                destination="PACS@10.0.0.9:104",
                status="delivered",
                attempts=1,
                created_at=T0 + timedelta(seconds=2320),
                delivered_at=T0 + timedelta(seconds=2321),
            )
        )
        audit.record(s, T0 + timedelta(seconds=5990), "web:10.0.0.66", Action.LOGIN_FAILED, "user", "root", address="10.0.0.66")
        audit.record(
            s,
            T0 + timedelta(seconds=5995),
            "cli:ops",
            Action.JOB_RETRY_REQUESTED,
            "job",
            ids["failed_job"],
            study_uid=study_uid("A1006"),
            previous_error="PermanentJobError: unreadable pixel data",
        )
        audit.record(s, T0 + timedelta(seconds=6000), "user:jones", Action.LOGIN_SUCCEEDED, "user", "jones", address="10.0.0.8")
        audit.record(
            s,
            T0 + timedelta(seconds=6001),
            "user:jones",
            Action.STUDY_VIEWED,
            "sr_document",
            f"{study_uid('A1005')}.1.1",
            study_uid=study_uid("A1005"),
            address="10.0.0.8",
        )
    return ids
