"""From a study version to a draft SR: captions per series, the SR on disk, its rows in the database.

The SR file is written first (atomically), then one transaction records the SR, the text per
series, a dispatch per destination and the job's success with their audit events. That
transaction is the point of no return: a worker killed before it leaves an orphan file and a
job that runs again; two workers racing on one job (a stale job taken over) both try to commit,
and the unique idempotency key plus the conditional job update let exactly one through.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_io.header_facts import Code, HeaderFacts, procedure_code, series_facts
from dicom_io.key_slices import KeySliceSpec
from dicom_io.model_input import SeriesInput, prepare_series
from dicom_io.sr import SR_SOP_CLASS_UID, AlgorithmInfo, SeriesFinding, SupersededDraft, read_impression, write_draft_sr
from models.demo import DEMO_NOTICE, is_demo
from models.families import ImageCaptioner
from models.grounding import GroundedDraft, ground, prompt_for
from service import audit, draft_outcomes, routing
from service import dispatch_lifecycle as dispatches
from service import job_lifecycle as jobs
from service import outputs as output_kinds
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.outputs import OutputKinds
from service.routing import Decision, RuleSet
from service.schema import (
    Draft,
    Instance,
    Job,
    SeriesRecord,
    SRDocument,
    SRKind,
    Study,
    StudyVersion,
)
from service.storage import Storage, StorageError

LOG = logging.getLogger(__name__)


class PermanentJobError(Exception):
    """Retrying cannot help (unreadable input, an SR that cannot be built): the job fails at once."""


@dataclass(frozen=True)
class DraftOptions:
    generation_preset: str = "fast"
    key_slices: KeySliceSpec = KeySliceSpec()
    batch_size: int = 8
    destinations: tuple[str, ...] = ()
    storage: Storage = field(default_factory=lambda: Storage("medcap-data"))  # the data dir (settings.storage)
    # Each destination gets the output of its kind (service/outputs): the SR over C-STORE by default.
    outputs: OutputKinds = field(default_factory=output_kinds.default)
    # Which series are captioned, by which model, and where their SR goes (service/routing.py).
    routing: RuleSet = field(default_factory=routing.default)

    def __post_init__(self) -> None:
        for destination in (*self.destinations, *(d for r in self.routing.rules for d in r.destinations or ())):
            self.outputs.for_destination(destination)  # a destination no kind sends to fails here, not after captioning


@dataclass(frozen=True)
class DraftSource:
    study_id: int
    study_uid: str
    version_id: int
    version_number: int
    instances: dict[str, tuple[str, str]]  # sop_instance_uid -> (sop_class_uid, recorded path), captionable only
    series_of: dict[str, str] = field(default_factory=dict)  # sop_instance_uid -> series_instance_uid


@dataclass(frozen=True)
class WrittenSR:
    """One model's draft SR of a study version, on disk, waiting for the commit that records it."""

    key: str
    model: ImageCaptioner
    sr: Dataset
    path: Path
    digest: str
    series: list[SeriesInput]
    grounded: list[GroundedDraft]
    facts: list[HeaderFacts]
    captions: list[list[str]]
    inferred_at: object
    destinations: tuple[str, ...]
    supersedes: tuple[int, SupersededDraft] | None = None  # the earlier version's draft this one replaces (row id, reference)


class Drafter:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        model: ImageCaptioner,
        options: DraftOptions,
        actor: str,
        owner: str | None = None,
        models: Callable[[str], ImageCaptioner] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.model = model  # the default model (MEDCAP_MODEL)
        self.models = models  # the models a rule file names in [models], by name (loaded once per worker process)
        self.options = options
        self.actor = actor
        self.owner = owner  # the claim's owner (workers/jobs.py): only the job's current owner commits its success

    def draft(self, job_id: int) -> str:
        """Caption the job's study version and commit the draft SR(s). The job must be claimed (running).

        The routing rules decide each series first (from the database and one header per series);
        the captioned series are grouped by model, one draft SR per model."""
        source = self._source(job_id)
        decisions = self._route(source)
        groups: dict[str, list[Decision]] = {}
        for decision in decisions:
            if decision.model is not None:
                groups.setdefault(decision.model, []).append(decision)
        if not groups:
            if not decisions:
                return self._finish_without_sr(job_id, source, "no CT or MR image series to caption", decisions)
            rules = ", ".join(sorted({d.rule for d in decisions}))
            return self._finish_without_sr(job_id, source, f"every series skipped by the routing rules ({rules})", decisions)
        # One SR per distinct weights: two names for the same checkpoint are one model (and one key).
        planned: dict[str, tuple[ImageCaptioner, list[Decision]]] = {}
        for name, group in groups.items():
            model = self._model(name)
            key = f"draft:{source.version_id}:{model.identity.weights_sha256}"  # type: ignore[attr-defined]
            planned.setdefault(key, (model, []))[1].extend(group)
        if self._already_written(next(iter(planned))):  # one transaction commits every model's SR: one is there, all are
            return self._finish_without_sr(job_id, source, "a draft SR for this study version and model exists already", decisions)
        written: list[WrittenSR] = []
        try:
            for key, (model, group) in planned.items():
                if (sr := self._write(source, model, group, key)) is not None:
                    written.append(sr)
            if not written:
                return self._finish_without_sr(job_id, source, "no CT or MR image series to caption", decisions)
            return self._commit(job_id, source, written, decisions)
        except BaseException:
            for sr in written:
                self.options.storage.delete(sr.path)  # not recorded, so never sent: remove the orphan
            raise

    def _write(self, source: DraftSource, model: ImageCaptioner, group: Sequence[Decision], key: str) -> WrittenSR | None:
        """Caption ``group``'s series with ``model`` and store the draft SR (not yet recorded)."""
        series = self._prepare(source, {d.series_uid for d in group}, model)
        if not series:
            return None
        facts = [facts_of(s) for s in series]
        grounded, captions = self._caption(series, model, facts)
        texts = [g.text for g in grounded]
        inferred_at = self.clock.now()
        identity = model.identity
        algorithm = AlgorithmInfo(identity.name, identity.version, identity.weights_sha256, self.options.generation_preset)  # type: ignore[attr-defined]
        findings = [
            SeriesFinding(
                s.series_uid,
                text,
                [(source.instances[uid][0], uid, frame) for uid, frame in zip(s.sop_instance_uids, s.key_slices.frames, strict=True)],
                finding_site=f.region.code if f.region else None,
                laterality=f.laterality_code,
            )
            for s, text, f in zip(series, texts, facts, strict=True)
        ]
        previous = self._previous_draft(source, identity.weights_sha256)  # type: ignore[attr-defined]
        try:
            sr = write_draft_sr(
                findings,
                with_demo_notice(grounded_impression(grounded), identity.name),  # type: ignore[attr-defined]
                algorithm,
                sr_evidence(series),
                created_at=inferred_at,
                procedures=procedures_of(facts),
                # the PACS tells the versions' drafts apart by instance number, and the text says which one is current
                instance_number=source.version_number,
                supersedes=previous[1] if previous else None,
            )
        except ValueError as exc:
            raise PermanentJobError(f"cannot build the draft SR: {exc}") from exc
        path, digest = self._store(sr, source.study_uid)
        destinations: dict[str, None] = {}  # the union of the series' destinations, in order
        for decision in group:
            destinations.update(dict.fromkeys(self.options.destinations if decision.destinations is None else decision.destinations))
        return WrittenSR(key, model, sr, path, digest, series, grounded, facts, captions, inferred_at, tuple(destinations), previous)

    # -- steps -----------------------------------------------------------------------------

    def _source(self, job_id: int) -> DraftSource:
        with self.db.session() as s:
            row = s.execute(
                select(Study.id, Study.study_uid, StudyVersion.id, StudyVersion.number)
                .join(StudyVersion, StudyVersion.study_id == Study.id)
                .join(Job, Job.study_version_id == StudyVersion.id)
                .where(Job.id == job_id)
            ).one()
            instances = s.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path, SeriesRecord.series_uid)
                .join(SeriesRecord, SeriesRecord.id == Instance.series_id)
                .where(Instance.study_id == row[0], Instance.captionable, Instance.version_number <= row[3])
            ).all()
        return DraftSource(
            row[0],
            row[1],
            row[2],
            row[3],
            {uid: (cls, path) for uid, cls, path, _ in instances},
            {uid: series_uid for uid, _, _, series_uid in instances},
        )

    def _route(self, source: DraftSource) -> list[Decision]:
        """The rules' decision for each series of the version: facts from the rows and one header per series."""
        try:
            with self.db.session() as s:
                facts = routing.study_facts(
                    s, self.options.storage, source.study_id, source.version_number, headers=self.options.routing.reads_headers
                )
        except (StorageError, pydicom.errors.InvalidDicomError) as exc:  # missing, or recorded outside the data dir
            raise PermanentJobError(f"cannot read the study's headers for routing: {exc}") from exc
        try:
            return [self.options.routing.decide(f) for f in facts]
        except routing.RoutingError as exc:  # a pattern that ran out of time: retrying would hang again
            raise PermanentJobError(f"routing rules: {exc}") from exc

    def _model(self, name: str) -> ImageCaptioner:
        if name == routing.DEFAULT_MODEL:
            return self.model
        if self.models is None:
            raise PermanentJobError(f"the routing rules chose model {name!r}, which this worker cannot load")
        return self.models(name)

    def _previous_draft(self, source: DraftSource, weights_sha256: str) -> tuple[int, SupersededDraft] | None:
        """The draft SR of an earlier version of the study that the one being made replaces (its row
        id, and what the new SR says of it): the newest by the same model, else the newest by any
        (the routing rules may have chosen another model); None for the study's first draft."""
        with self.db.session() as s:
            rows = s.execute(
                select(SRDocument.id, SRDocument.series_uid, SRDocument.sop_instance_uid, StudyVersion.number, SRDocument.idempotency_key)
                .join(StudyVersion, StudyVersion.id == SRDocument.study_version_id)
                .where(
                    SRDocument.study_id == source.study_id,
                    SRDocument.kind == SRKind.DRAFT.value,
                    StudyVersion.number < source.version_number,
                )
                .order_by(StudyVersion.number.desc(), SRDocument.id.desc())
            ).all()
        if not rows:
            return None
        # a draft's key is "draft:<study version>:<weights sha256>"
        row = next((r for r in rows if str(r[4]).endswith(f":{weights_sha256}")), rows[0])
        return int(row[0]), SupersededDraft(source.study_uid, str(row[1]), SR_SOP_CLASS_UID, str(row[2]), int(row[3]))

    def _already_written(self, key: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(SRDocument.id).where(SRDocument.idempotency_key == key)) is not None

    def _prepare(self, source: DraftSource, series_uids: set[str], model: ImageCaptioner) -> list[SeriesInput]:
        chosen = (path for uid, (_, path) in source.instances.items() if source.series_of[uid] in series_uids)
        try:
            paths = self.options.storage.existing_all(chosen)
        except StorageError as exc:  # missing, or recorded outside the data dir
            raise PermanentJobError(str(exc)) from exc
        try:
            return prepare_series(paths, key_slices=self.options.key_slices, views=model.views) if paths else []
        except (ValueError, pydicom.errors.InvalidDicomError) as exc:
            raise PermanentJobError(f"cannot read the study's images: {exc}") from exc

    def _caption(
        self, series: Sequence[SeriesInput], model: ImageCaptioner, facts: Sequence[HeaderFacts]
    ) -> tuple[list[GroundedDraft], list[list[str]]]:
        """All key images of the series through the model in batches; one grounded draft per series
        (a heading from its header facts, the model's sentences that do not contradict them)."""
        if getattr(model, "reads_series", False):  # a VLM (hf-vlm): each series' key images together, its facts in the prompt
            requests = [(dict(s.views), prompt_for(f)) for s, f in zip(series, facts, strict=True)]
            captions = model.caption_series(requests, self.options.generation_preset, batch_size=self.options.batch_size)  # type: ignore[attr-defined]
        else:
            inputs = {v.name: np.concatenate([s.views[v.name] for s in series]) for v in model.views}
            flat = model.caption(inputs, self.options.generation_preset, batch_size=self.options.batch_size)
            captions, start = [], 0
            for s in series:
                captions.append(flat[start : start + len(s.key_slices)])
                start += len(s.key_slices)
        captions = [[printable(c) for c in series_captions] for series_captions in captions]
        return [ground(c, f) for c, f in zip(captions, facts, strict=True)], captions

    def _store(self, sr: Dataset, study_uid: str) -> tuple[Path, str]:
        try:
            stored = self.options.storage.write_report(study_uid, sr)
        except StorageError as exc:  # a study UID no file name may hold
            raise PermanentJobError(f"cannot store the draft SR: {exc}") from exc
        return stored.path, stored.sha256

    def _commit(self, job_id: int, source: DraftSource, written: Sequence[WrittenSR], decisions: Sequence[Decision]) -> str:
        now = self.clock.now()
        try:
            with self.db.session() as s:
                started_at = s.scalar(select(Job.started_at).where(Job.id == job_id))
                docs = [self._record_sr(s, now, job_id, source, w) for w in written]
                routing.record(
                    s, now, self.actor, source.version_id, source.study_uid, decisions, self.options.routing.source, job_id=job_id
                )
                inferred_at = written[-1].inferred_at
                seconds = (inferred_at - started_at).total_seconds() if started_at is not None else None  # type: ignore[operator]
                extra = {"srs": [d.sop_instance_uid for d in docs]} if len(docs) > 1 else {}
                if not jobs.succeed(
                    s,
                    now,
                    self.actor,
                    job_id,
                    owner=self.owner,
                    study_uid=source.study_uid,
                    inferred_at=inferred_at,  # type: ignore[arg-type]
                    sr_written=True,
                    sr=docs[0].sop_instance_uid,
                    seconds_inference=seconds,
                    **extra,
                ):
                    raise NotOurs  # superseded, or taken over: the whole transaction (SR rows included) rolls back
                for doc in docs:
                    draft_outcomes.refresh(s, doc.id)
        except NotOurs:
            LOG.info("job %d: no longer ours (superseded or finished elsewhere); draft discarded", job_id)
            raise
        except IntegrityError:
            LOG.info("job %d: a draft SR for %s was committed concurrently; ours is discarded", job_id, written[0].key)
            raise NotOurs from None
        for w in written:
            LOG.info("job %d: draft SR %s for study %s (%d series)", job_id, w.sr.SOPInstanceUID, source.study_uid, len(w.series))
        return "succeeded"

    def _record_sr(self, s: Session, now: datetime, job_id: int, source: DraftSource, w: WrittenSR) -> SRDocument:
        """One written SR's rows: the SR, the text per series, its audit event and its dispatches."""
        identity = w.model.identity
        sr = w.sr
        doc = SRDocument(
            kind=SRKind.DRAFT.value,
            idempotency_key=w.key,
            study_id=source.study_id,
            study_version_id=source.version_id,
            job_id=job_id,
            predecessor_id=w.supersedes[0] if w.supersedes else None,  # the earlier version's draft (a verified SR's: its draft)
            sop_instance_uid=str(sr.SOPInstanceUID),
            series_uid=str(sr.SeriesInstanceUID),
            completion_flag=str(sr.CompletionFlag),
            verification_flag=str(sr.VerificationFlag),
            path=str(w.path),
            sha256=w.digest,
            created_at=now,
            created_by=self.actor,
            impression=read_impression(sr),  # for the review page, which then never reads the file
        )
        s.add(doc)
        s.flush()
        for item, draft, item_facts, item_captions in zip(w.series, w.grounded, w.facts, w.captions, strict=True):
            s.add(
                Draft(
                    sr_document_id=doc.id,
                    job_id=job_id,
                    series_uid=item.series_uid,
                    modality=item.modality,
                    text=draft.text,
                    key_images=[
                        {"sop_instance_uid": u, "frame": f, "caption": c}
                        for u, f, c in zip(item.sop_instance_uids, item.key_slices.frames, item_captions, strict=True)
                    ],
                    model_name=identity.name,
                    model_type=identity.model_type,
                    model_version=identity.version,  # type: ignore[attr-defined]
                    weights_sha256=identity.weights_sha256,
                    generation_preset=self.options.generation_preset,
                    created_at=now,
                    header_facts=item_facts.as_dict(),
                    removed_sentences=[r.as_dict() for r in draft.removed],
                )
            )
        audit.record(
            s,
            now,
            self.actor,
            Action.SR_WRITTEN,
            "sr_document",
            doc.sop_instance_uid,
            study_uid=source.study_uid,
            kind="draft",
            job_id=job_id,
            study_version=source.version_number,
            series=len(w.series),
            sentences_removed=sum(len(d.removed) for d in w.grounded),
            supersedes=w.supersedes[1].sop_instance_uid if w.supersedes else None,
            model=identity.name,
            model_version=identity.version,  # type: ignore[attr-defined]
            weights_sha256=identity.weights_sha256,  # type: ignore[attr-defined]
            generation_preset=self.options.generation_preset,
        )
        dispatches.create_all(s, now, self.actor, doc, source.study_uid, w.destinations, self.options.outputs)
        return doc

    def _finish_without_sr(self, job_id: int, source: DraftSource, why: str, decisions: Sequence[Decision]) -> str:
        now = self.clock.now()
        with self.db.session() as s:
            if jobs.succeed(s, now, self.actor, job_id, owner=self.owner, study_uid=source.study_uid, result=why):
                routing.record(
                    s, now, self.actor, source.version_id, source.study_uid, decisions, self.options.routing.source, job_id=job_id
                )
        LOG.info("job %d: %s", job_id, why)
        return "succeeded"


class NotOurs(Exception):
    """The job was superseded or completed by another worker while this one ran."""


def printable(text: str) -> str:
    """Model output as DICOM text: no control characters (an SR value may not hold them), no
    undecodable-byte markers, single spaces."""
    kept = "".join(ch if ch in "\n\t" or unicodedata.category(ch)[0] != "C" and ch != "\ufffd" else " " for ch in text)
    return " ".join(kept.split())


def sr_evidence(series: Sequence[SeriesInput]) -> list[Dataset]:
    """Every instance of the captioned series, from the headers :func:`load_series` kept: no file is
    read again. Per series its kept header (patient, study and equipment, which the SR copies from
    the first), the other instances by their UIDs, which is all the evidence sequence needs of them."""
    evidence = []
    for item in series:
        header = item.series.header
        evidence.append(header)
        for uid in item.series.sop_instance_uids:
            if uid != header.SOPInstanceUID:
                ref = Dataset()
                ref.StudyInstanceUID = item.series.study_uid
                ref.SeriesInstanceUID = item.series.series_uid
                ref.SOPClassUID = item.series.sop_class_uid
                ref.SOPInstanceUID = uid
                evidence.append(ref)
    return evidence


def facts_of(item: SeriesInput) -> HeaderFacts:
    """The series' header facts; a header they cannot be read from grounds nothing rather than failing the job."""
    try:
        return series_facts(item.series)
    except ValueError as exc:
        LOG.warning("series %s: no header facts (%s); its draft is not grounded", item.series_uid, exc)
        return HeaderFacts(conflicts=(f"header facts could not be read: {exc}",))


def procedures_of(facts: Sequence[HeaderFacts]) -> list[Code]:
    """One coded procedure per distinct modality of the captioned series: the SR's "Procedure reported"."""
    return list(dict.fromkeys(procedure_code(f.modality) for f in facts if f.modality))


def with_demo_notice(impression: str, model_name: str) -> str:
    """The demo model's SRs say in their text that it is for trying MedCap only (its name says so too)."""
    return f"{DEMO_NOTICE} {impression}" if is_demo(model_name) else impression


def draft_impression(texts: Sequence[str]) -> str:
    from models.captioner import summarise

    return summarise(texts) or "(no impression)"


def grounded_impression(grounded: Sequence[GroundedDraft]) -> str:
    """The series whose drafts kept a model sentence, each under its heading; none: say so."""
    kept = [g.text for g in grounded if g.kept]
    return draft_impression(kept) if kept else "(no impression: no model sentence was left after checking against the DICOM header)"
