"""A real PACS as the sender: Orthanc pushes studies to the listener over C-STORE.

One Orthanc runs per test session (the ``orthanc`` fixture in tests/conftest.py); the CT and MR
series are uploaded to it once. Each test registers its own listener in Orthanc and asks Orthanc to
push, exactly as a hospital PACS would be configured to route studies to MedCap.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from service.assembly import Assembler
from service.database import Database
from service.schema import (
    Association,
    AuditEvent,
    Instance,
    Job,
    SeriesRecord,
    Study,
    StudyVersion,
)
from tests.conftest import ORTHANC_AET, delete_srs, wait_until

pytestmark = pytest.mark.orthanc

CT = "ct-head-ge"
MR = "mr-t1-brain-uih"


# -- helpers ---------------------------------------------------------------------------------


class RecordingPublisher:
    """Stands in for Celery: remembers which job ids were handed on."""

    def __init__(self) -> None:
        self.published: list[int] = []

    def publish(self, job_id: int) -> None:
        self.published.append(job_id)


def make_assembler(db: Database, clock, settings) -> tuple[Assembler, RecordingPublisher]:
    publisher = RecordingPublisher()
    assembler = Assembler(
        db,
        clock,
        publisher,
        quiet_seconds=settings.quiet_seconds,
        max_wait_seconds=settings.max_wait_seconds,
        redeliver_seconds=settings.job_redeliver_seconds,
    )
    return assembler, publisher


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def wait_for_associations_closed(db: Database, expected: int) -> None:
    """Orthanc's HTTP reply can come before our listener has recorded the release: poll for it."""

    def closed() -> bool:
        with db.session() as s:
            rows = s.scalars(select(Association)).all()
        return len(rows) == expected and all(row.ended_at is not None for row in rows)

    wait_until(closed, f"{expected} closed association row(s)")


@pytest.fixture
def orthanc_listener(start_listener, make_settings, orthanc):
    """A listener that admits only Orthanc's AE title from loopback (and an Orthanc holding only
    the uploaded studies: SRs another module's test sent there would be pushed too)."""
    delete_srs(orthanc)
    return start_listener(make_settings(allowed_peers=f"{ORTHANC_AET}@127.0.0.1/32"))


# -- tests -----------------------------------------------------------------------------------


def test_orthanc_pushes_ct_and_mr_studies_which_become_one_version_and_job_each(db, orthanc, pacs_studies, orthanc_listener, clock):
    settings = orthanc_listener.settings
    orthanc.register("medcap", "MEDCAP", orthanc_listener.port)
    for name in (CT, MR):
        reply = orthanc.push("medcap", pacs_studies[name].orthanc_id)
        assert reply.get("FailedInstancesCount", 0) == 0, reply
    wait_for_associations_closed(db, expected=2)

    with db.session() as s:
        instances = s.scalars(select(Instance)).all()
        associations = s.scalars(select(Association).order_by(Association.id)).all()
        studies = {study.study_uid: study for study in s.scalars(select(Study))}
        series = s.scalars(select(SeriesRecord)).all()
    # Every instance of both studies arrived, exactly once, with its bytes intact on disk.
    sent = pacs_studies[CT].files.keys() | pacs_studies[MR].files.keys()
    assert {i.sop_instance_uid for i in instances} == sent and len(instances) == len(sent)
    for inst in instances:
        data = Path(inst.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == inst.sha256 and len(data) == inst.size
        assert inst.captionable
    # One association per push, from Orthanc, cleanly released and fully counted.
    for assoc, name in zip(associations, (CT, MR), strict=True):
        assert (assoc.calling_ae, assoc.called_ae, assoc.peer_address) == (ORTHANC_AET, "MEDCAP", "127.0.0.1")
        assert assoc.outcome == "released" and not assoc.tls
        assert (assoc.instances_received, assoc.instances_failed) == (len(pacs_studies[name].files), 0)
    # The MR's identifying attributes are recorded as the modality wrote them (UTF-8 character set).
    mr_source = pydicom.dcmread(next(iter(pacs_studies[MR].files.values())), stop_before_pixels=True)
    mr_study = studies[pacs_studies[MR].study_uid]
    assert mr_study.patient_name == str(mr_source.PatientName).strip()
    assert mr_study.patient_id == str(mr_source.PatientID).strip()
    mr_series = next(s for s in series if s.modality == "MR")
    assert mr_series.series_description == "t1_gre_fsp_3d_sag" and mr_series.study_id == mr_study.id
    assert {s.modality for s in series} == {"CT", "MR"}
    # What Orthanc relayed is the DICOM the modality wrote: same data set, element for element.
    for inst in (i for i in instances if i.study_id == mr_study.id):
        assert pydicom.dcmread(inst.path) == pydicom.dcmread(pacs_studies[MR].files[inst.sop_instance_uid])

    # Both studies wait for the quiet period, then each becomes exactly one version with one job.
    assembler, publisher = make_assembler(db, clock, settings)
    assert assembler.tick() == [], "nothing is stable before quiet_seconds have passed"
    clock.advance(settings.quiet_seconds + 1)
    jobs = assembler.tick()
    assert len(jobs) == 2 and publisher.published == jobs
    assert assembler.tick() == [], "a second pass finds nothing new"
    with db.session() as s:
        versions = s.scalars(select(StudyVersion)).all()
        assert sorted(s.scalars(select(Job.id))) == sorted(jobs)
        assert set(s.scalars(select(Job.status))) == {"enqueued"}
        assert s.scalar(select(func.count()).where(Instance.version_number.is_(None))) == 0
    expected = {studies[study.study_uid].id: (1, "stable", len(study.files)) for study in pacs_studies.values()}
    assert {v.study_id: (v.number, v.trigger, v.instance_count) for v in versions} == expected


def test_pushing_the_same_study_twice_adds_no_rows(db, orthanc, pacs_studies, orthanc_listener, clock):
    settings = orthanc_listener.settings
    ct = pacs_studies[CT]
    orthanc.register("medcap", "MEDCAP", orthanc_listener.port)
    orthanc.push("medcap", ct.orthanc_id)
    wait_for_associations_closed(db, expected=1)
    assembler, publisher = make_assembler(db, clock, settings)
    clock.advance(settings.quiet_seconds + 1)
    assert len(assembler.tick()) == 1

    # A PACS re-sends whole studies routinely (operator retries, routing rules firing twice).
    reply = orthanc.push("medcap", ct.orthanc_id)
    assert reply.get("FailedInstancesCount", 0) == 0, "a re-sent instance must get Success"
    wait_for_associations_closed(db, expected=2)
    clock.advance(settings.quiet_seconds + 1)
    assert assembler.tick() == [], "identical instances must not make a new version"

    assert count(db, Instance) == len(ct.files)
    assert count(db, Study) == 1 and count(db, SeriesRecord) == 1
    assert count(db, StudyVersion) == 1 and count(db, Job) == 1 and len(publisher.published) == 1
    assert len([p for p in settings.storage.instances_dir.rglob("*") if p.is_file()]) == len(ct.files)
    with db.session() as s:
        second = s.scalars(select(Association).order_by(Association.id.desc())).first()
    assert second is not None and second.outcome == "released"
    assert (second.instances_received, second.instances_duplicate) == (0, len(ct.files))


def test_orthanc_not_in_the_allow_list_is_refused(db, orthanc, pacs_studies, start_listener, make_settings):
    listener = start_listener(make_settings(allowed_peers="OTHER@127.0.0.1/32"))
    orthanc.register("medcap", "MEDCAP", listener.port)

    with pytest.raises(urllib.error.HTTPError) as failure:
        orthanc.push("medcap", pacs_studies[CT].orthanc_id)
    assert failure.value.code >= 400

    # The listener answers A-ASSOCIATE-RJ before it commits the refusal: poll briefly for the row.
    wait_until(lambda: count(db, AuditEvent) > 0, "the association.rejected audit event")
    with db.session() as s:
        assoc = s.scalars(select(Association)).one()
        event = s.scalars(select(AuditEvent)).one()
    assert event.action == "association.rejected"
    assert assoc.outcome == "rejected" and f"{ORTHANC_AET}@127.0.0.1" in assoc.reason
    assert event.actor == f"dicom:{ORTHANC_AET}@127.0.0.1" and event.object_id == str(assoc.id)
    assert count(db, Instance) == 0 and count(db, Study) == 0
    assert not any(p.is_file() for p in listener.settings.storage.instances_dir.rglob("*"))
