"""A radiologist's decision on a draft: approve (as is or edited) into a verified SR, or reject.

Approval writes a new SR (COMPLETE / VERIFIED / FINAL, the radiologist as verifying observer, the
draft as predecessor), then one transaction records it, the review, its dispatches and the audit
event. The review's unique draft id and the verified SR's idempotency key make a second approval
of the same draft a :class:`ReviewConflict`, never a second SR. Drafts of a superseded study
version cannot be approved.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from dicom_io.sr import SeriesFinding, Verification, read_findings, read_impression, write_verified_sr
from models.demo import is_demo
from service import audit, draft_outcomes, routing
from service import dispatch_lifecycle as dispatches
from service import outputs as output_kinds
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.outputs import OutputKinds
from service.schema import Decision, Draft, Review, SRDocument, SRKind, Study, StudyVersion
from service.storage import Storage
from service.users import Account


class ReviewState(enum.StrEnum):
    AWAITING = "awaiting review"
    APPROVED = "approved"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"  # a newer version of the study has its own draft


class ReviewError(ValueError):
    """The decision cannot be made (wrong state, bad input); the message says why."""


class ReviewConflict(ReviewError):
    """Someone decided on this draft first."""


@dataclass(frozen=True)
class DraftView:
    """A draft SR with what a reviewer needs to see, from the database (the SR file is not read)."""

    id: int
    sop_instance_uid: str
    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_version: int
    created_at: datetime
    state: ReviewState
    model_name: str
    model_version: str
    weights_sha256: str
    generation_preset: str
    series: list[dict[str, object]] = field(default_factory=list)  # [{series_uid, modality, text, key_images}]
    impression: str = ""
    review: dict[str, object] | None = None

    @property
    def demo_model(self) -> bool:
        """Drafted by the demo model, which is for trying MedCap only (the page says so)."""
        return is_demo(self.model_name)


def state_of(decision: str | None, version: int, latest: int) -> ReviewState:
    if decision is not None:
        return ReviewState(decision)
    return ReviewState.SUPERSEDED if version < latest else ReviewState.AWAITING


class Reviews:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        storage: Storage,
        destinations: Sequence[str],
        organization: str,
        outputs: OutputKinds | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.storage = storage
        self.outputs = outputs or output_kinds.default()  # each destination gets its kind's output of the verified report
        self.destinations = tuple(destinations)
        for destination in self.destinations:
            self.outputs.for_destination(destination)
        self.organization = organization

    def view(self, draft_id: int) -> DraftView | None:
        with self.db.session() as s:
            row = s.execute(
                select(SRDocument, Study, StudyVersion.number)
                .join(Study, Study.id == SRDocument.study_id)
                .join(StudyVersion, StudyVersion.id == SRDocument.study_version_id)
                .where(SRDocument.id == draft_id, SRDocument.kind == SRKind.DRAFT)
            ).first()
            if row is None:
                return None
            doc, study, number = row
            latest = s.scalar(select(func.max(StudyVersion.number)).where(StudyVersion.study_id == study.id)) or number
            drafts = s.scalars(select(Draft).where(Draft.sr_document_id == doc.id).order_by(Draft.id)).all()
            review = s.scalar(select(Review).where(Review.draft_sr_id == doc.id))
            verified_uid = s.scalar(select(SRDocument.sop_instance_uid).where(SRDocument.id == review.verified_sr_id)) if review else None
        first = drafts[0] if drafts else None
        impression = doc.impression if doc.impression is not None else self._stored_impression(doc)
        return DraftView(
            doc.id,
            doc.sop_instance_uid,
            study.study_uid,
            study.accession_number,
            study.patient_id,
            study.patient_name,
            number,
            doc.created_at,
            state_of(review.decision if review else None, number, latest),
            first.model_name if first else "",
            first.model_version if first else "",
            first.weights_sha256 if first else "",
            first.generation_preset if first else "",
            [
                {
                    "series_uid": d.series_uid,
                    "modality": d.modality,
                    "text": d.text,
                    "key_images": d.key_images,
                    # grounding (models/grounding.py): model sentences removed for contradicting the header
                    "removed_sentences": d.removed_sentences or [],
                }
                for d in drafts
            ],
            impression,
            {
                "decision": review.decision,
                "reason": review.reason,
                "decided_at": review.decided_at,
                "edited": review.edited,
                "verified_sr": verified_uid,
                "findings": review.findings,
                "impression": review.impression,
            }
            if review
            else None,
        )

    def _stored_impression(self, doc: SRDocument) -> str:
        """A draft written before migration 0007: its impression from the file, kept for later views."""
        impression = read_impression(self.storage.read_dataset(doc.path))
        with self.db.session() as s:
            s.execute(update(SRDocument).where(SRDocument.id == doc.id, SRDocument.impression.is_(None)).values(impression=impression))
        return impression

    def approve(
        self,
        draft_id: int,
        reviewer: Account,
        *,
        findings: Mapping[str, str] | None = None,
        impression: str | None = None,
        address: str = "",
    ) -> str:
        """Write the verified SR; returns its SOP Instance UID. ``findings`` maps series UID → final text."""
        if reviewer.is_admin:
            raise ReviewError("only radiologists sign reports")
        doc, study_uid = self._decidable(draft_id)
        draft = self.storage.read_dataset(doc.path)
        draft_findings = read_findings(draft)
        draft_impression = read_impression(draft)
        finals = _final_findings(draft_findings, findings or {})
        final_impression = (impression if impression is not None else draft_impression).strip()
        if not final_impression:
            raise ReviewError("the impression must not be empty")
        now = self.clock.now()
        verification = Verification(reviewer.display_name, self.organization, now)
        sr = write_verified_sr(draft, verification, findings=finals, impression=final_impression)
        stored = self.storage.write_report(study_uid, sr)
        pairs = [(d.text, f.text) for d, f in zip(draft_findings, finals, strict=True)] + [(draft_impression, final_impression)]
        distance = sum(edit_distance(a, b) for a, b in pairs)
        actor = audit.web_actor(reviewer.username)
        try:
            with self.db.session() as s:
                verified = SRDocument(
                    kind=SRKind.VERIFIED.value,
                    idempotency_key=f"verified:{doc.id}",
                    study_id=doc.study_id,
                    study_version_id=doc.study_version_id,
                    job_id=None,
                    predecessor_id=doc.id,
                    sop_instance_uid=str(sr.SOPInstanceUID),
                    series_uid=str(sr.SeriesInstanceUID),
                    completion_flag=str(sr.CompletionFlag),
                    verification_flag=str(sr.VerificationFlag),
                    path=str(stored.path),
                    sha256=stored.sha256,
                    created_at=now,
                    created_by=actor,
                    impression=final_impression,
                )
                s.add(verified)
                s.flush()
                s.add(
                    Review(
                        draft_sr_id=doc.id,
                        decision=Decision.APPROVED.value,
                        reviewer_id=reviewer.id,
                        decided_at=now,
                        verified_sr_id=verified.id,
                        edited=distance > 0,
                        edit_distance=distance,
                        draft_characters=sum(len(a) for a, _ in pairs),
                        impression=final_impression,
                        findings=[
                            {"series_uid": d.series_uid, "draft": d.text, "final": f.text}
                            for d, f in zip(draft_findings, finals, strict=True)
                        ],
                    )
                )
                s.flush()
                audit.record(
                    s,
                    now,
                    actor,
                    Action.DRAFT_APPROVED,
                    "sr_document",
                    doc.sop_instance_uid,
                    study_uid=study_uid,
                    verified_sr=verified.sop_instance_uid,
                    edited=distance > 0,
                    edit_distance=distance,
                    address=address,
                )
                # The verified report goes where the routing rules sent its draft (MEDCAP_DESTINATIONS by default).
                routed = routing.report_destinations(s, doc.study_version_id, [d.series_uid for d in draft_findings], self.destinations)
                dispatches.create_all(s, now, actor, verified, study_uid, routed, self.outputs)
                draft_outcomes.refresh(s, doc.id)
        except IntegrityError:
            self.storage.delete(stored.path)
            self._conflict(doc, study_uid, reviewer, address)
        return str(sr.SOPInstanceUID)

    def reject(self, draft_id: int, reviewer: Account, reason: str, *, address: str = "") -> None:
        if reviewer.is_admin:
            raise ReviewError("only radiologists decide on drafts")
        reason = (reason or "").strip()
        if not reason:
            raise ReviewError("a rejection needs a reason")
        doc, study_uid = self._decidable(draft_id, allow_superseded=True)
        now = self.clock.now()
        actor = audit.web_actor(reviewer.username)
        try:
            with self.db.session() as s:
                s.add(Review(draft_sr_id=doc.id, decision=Decision.REJECTED.value, reason=reason, reviewer_id=reviewer.id, decided_at=now))
                s.flush()
                audit.record(
                    s,
                    now,
                    actor,
                    Action.DRAFT_REJECTED,
                    "sr_document",
                    doc.sop_instance_uid,
                    study_uid=study_uid,
                    reason=reason,
                    address=address,
                )
                draft_outcomes.refresh(s, doc.id)
        except IntegrityError:
            self._conflict(doc, study_uid, reviewer, address)

    def _decidable(self, draft_id: int, *, allow_superseded: bool = False) -> tuple[SRDocument, str]:
        with self.db.session() as s:
            row = s.execute(
                select(SRDocument, Study.study_uid, StudyVersion.number, Review.decision)
                .join(Study, Study.id == SRDocument.study_id)
                .join(StudyVersion, StudyVersion.id == SRDocument.study_version_id)
                .outerjoin(Review, Review.draft_sr_id == SRDocument.id)
                .where(SRDocument.id == draft_id, SRDocument.kind == SRKind.DRAFT)
            ).first()
            if row is None:
                raise ReviewError(f"there is no draft {draft_id}")
            doc, study_uid, number, decision = row
            latest = s.scalar(select(func.max(StudyVersion.number)).where(StudyVersion.study_id == doc.study_id)) or number
        state = state_of(decision, number, latest)
        if state in (ReviewState.APPROVED, ReviewState.REJECTED):
            raise ReviewConflict(f"this draft was already {state.value}")
        if state is ReviewState.SUPERSEDED and not allow_superseded:
            raise ReviewError("this draft is of a superseded study version: review the newer draft instead")
        return doc, study_uid

    def _conflict(self, doc: SRDocument, study_uid: str, reviewer: Account, address: str) -> None:
        with self.db.session() as s:
            audit.record(
                s,
                self.clock.now(),
                audit.web_actor(reviewer.username),
                Action.REVIEW_CONFLICT,
                "sr_document",
                doc.sop_instance_uid,
                study_uid=study_uid,
                address=address,
            )
        raise ReviewConflict("another radiologist decided on this draft first")


def _final_findings(draft: Sequence[SeriesFinding], edits: Mapping[str, str]) -> list[SeriesFinding]:
    known = {f.series_uid for f in draft}
    unknown = set(edits) - known
    if unknown:
        raise ReviewError(f"findings for series not in this draft: {sorted(unknown)}")
    finals = []
    for finding in draft:
        text = edits.get(finding.series_uid, finding.text).strip()
        if not text:
            raise ReviewError(f"the finding for series {finding.series_uid} must not be empty")
        finals.append(SeriesFinding(finding.series_uid, text, finding.key_images))
    return finals


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters (insertions, deletions, substitutions)."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
