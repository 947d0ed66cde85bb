"""Study assembly with real receipt (storescu → listener → database) and a hand-driven clock."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, update

from service.assembly import ForceResult
from service.database import Database
from service.schema import Association, AuditEvent, Instance, Job, StudyVersion
from service.study_status import list_studies
from tests.conftest import make_assembler, open_association, send_raw, series_files, storescu

CT = "ct-head-ge"


def versions(db: Database) -> list[StudyVersion]:
    with db.session() as s:
        return list(s.scalars(select(StudyVersion).order_by(StudyVersion.id)))


def jobs(db: Database) -> list[Job]:
    with db.session() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


@pytest.mark.peers
def test_study_becomes_stable_after_the_quiet_period(db, listener, settings, clock, assembler, publisher):
    assert storescu(listener, series_files(CT)).returncode == 0
    clock.advance(settings.quiet_seconds - 1)
    assert assembler.tick() == []
    clock.advance(2)
    created = assembler.tick()
    assert len(created) == 1 and publisher.published == created
    (version,) = versions(db)
    assert (version.number, version.trigger, version.instance_count, version.captionable_count) == (1, "stable", 28, 28)
    (job,) = jobs(db)
    assert job.status == "enqueued" and job.enqueued_at == clock.now()
    assert assembler.tick() == [] and publisher.published == created, "a stable study is handed over once"
    with db.session() as s:
        acts = list(s.scalars(select(AuditEvent.action).where(AuditEvent.actor == "system:assembler").order_by(AuditEvent.id)))
    assert acts == ["study.version_created", "job.created", "job.enqueued"]


@pytest.mark.peers
def test_parts_sent_further_apart_than_the_quiet_period_make_two_versions(db, listener, settings, clock, assembler, publisher):
    files = series_files(CT)
    assert storescu(listener, files[:14]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (first_job,) = assembler.tick()
    assert storescu(listener, files[14:]).returncode == 0  # the late series
    clock.advance(settings.quiet_seconds + 1)
    (second_job,) = assembler.tick()

    v1, v2 = versions(db)
    assert (v1.number, v1.instance_count) == (1, 14)
    assert (v2.number, v2.instance_count) == (2, 28), "a version holds the whole study, late instances included"
    j1, j2 = jobs(db)
    assert j1.status == "superseded" and j1.superseded_by_job_id == j2.id == second_job
    assert j2.status == "enqueued"
    assert publisher.published == [first_job, second_job]
    with db.session() as s:
        assert set(s.scalars(select(Instance.version_number))) == {1, 2}


@pytest.mark.peers
def test_parts_within_the_quiet_period_make_one_version(db, listener, settings, clock, assembler):
    files = series_files(CT)
    assert storescu(listener, files[:14]).returncode == 0
    clock.advance(settings.quiet_seconds / 2)
    assert storescu(listener, files[14:]).returncode == 0
    clock.advance(settings.quiet_seconds / 2 + 1)
    assert assembler.tick() == [], "the quiet period restarts with each arrival"
    clock.advance(settings.quiet_seconds)
    assert len(assembler.tick()) == 1
    assert [v.instance_count for v in versions(db)] == [28]


def _open_association(port: int, files):
    assoc = open_association(port, "SLOWPACS")
    assert send_raw(assoc, files) == [0] * len(files)
    return assoc


def test_open_association_still_sending_holds_the_study_until_it_ends(db, listener, settings, clock, assembler):
    assoc = _open_association(listener.port, series_files(CT)[:5])
    clock.advance(settings.quiet_seconds * 3)
    assert assembler.tick() == [], "quiet, but the sender has not released the association"
    assoc.release()
    assert listener.wait_idle(30)
    assert len(assembler.tick()) == 1


def test_max_wait_caps_a_study_that_never_goes_quiet(db, listener, make_settings, clock, publisher):
    settings = make_settings(quiet_seconds=30, max_wait_seconds=120)
    assembler = make_assembler(db, clock, settings, publisher)
    assoc = _open_association(listener.port, series_files(CT)[:3])
    clock.advance(119)
    assert assembler.tick() == []
    clock.advance(1)
    assert len(assembler.tick()) == 1
    assert versions(db)[0].trigger == "max_wait"
    assoc.release()


@pytest.mark.peers
def test_force(db, listener, clock, assembler):
    files = series_files(CT)
    assert storescu(listener, files[:3]).returncode == 0
    study_uid = list_studies(db)[0].study_uid
    assert assembler.request_force(study_uid, "cli:tester") is ForceResult.REQUESTED
    assert len(assembler.tick()) == 1, "no waiting for the quiet period"
    assert versions(db)[0].trigger == "forced"
    assert assembler.request_force(study_uid, "cli:tester") is ForceResult.NOTHING_PENDING
    assert assembler.request_force("1.2.3.4", "cli:tester") is ForceResult.UNKNOWN_STUDY
    # The force flag does not linger: later instances wait for their own quiet period.
    assert storescu(listener, files[3:6]).returncode == 0
    assert assembler.tick() == []
    with db.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.force_requested")).one()
    assert event.actor == "cli:tester" and event.study_uid == study_uid


@pytest.mark.peers
def test_restart_during_the_quiet_period_still_processes_the_study(database_url, settings, clock, start_listener, publisher):
    first = start_listener(settings, name="node-a:11112")
    assert storescu(first, series_files(CT)[:6]).returncode == 0
    first.stop()
    # A fresh process: new engine, new listener, new assembler; only the database remembers.
    db = Database(database_url)
    start_listener(settings, name="node-a:11112")
    clock.advance(settings.quiet_seconds + 1)
    assert len(make_assembler(db, clock, settings, publisher).tick()) == 1
    assert versions(db)[0].instance_count == 6
    db.dispose()


@pytest.mark.peers
def test_association_left_open_by_a_crashed_listener_is_marked_lost_on_restart(db, settings, clock, start_listener, assembler):
    first = start_listener(settings, name="node-a:11112")
    assert storescu(first, series_files(CT)[:4]).returncode == 0
    first.stop()
    with db.session() as s:  # what a SIGKILLed listener leaves behind
        s.execute(update(Association).values(ended_at=None, outcome="open"))
    clock.advance(settings.quiet_seconds + 1)
    assert assembler.tick() == [], "an association that looks open holds the study"
    start_listener(settings, name="node-a:11112")
    assert len(assembler.tick()) == 1
    with db.session() as s:
        assert s.scalar(select(Association.outcome)) == "lost"
        assert s.scalar(select(AuditEvent.action).where(AuditEvent.action == "association.lost")) is not None


@pytest.mark.peers
def test_concurrent_assemblers_create_one_version(db, listener, settings, clock, publisher):
    assert storescu(listener, series_files(CT)[:5]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    results: list[list[int]] = []
    assemblers = [make_assembler(Database(db.url), clock, settings, publisher) for _ in range(4)]
    threads = [threading.Thread(target=lambda a=a: results.append(a.tick())) for a in assemblers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    assert len(versions(db)) == 1 and len(jobs(db)) == 1
    for a in assemblers:
        a.db.dispose()


@pytest.mark.peers
def test_broker_outage_delays_but_does_not_lose_the_job(db, listener, settings, clock, assembler, publisher):
    assert storescu(listener, series_files(CT)[:2]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    publisher.fail = True
    created = assembler.tick()
    assert jobs(db)[0].status == "queued" and publisher.published == []
    publisher.fail = False
    assembler.tick()
    assert publisher.published == created and jobs(db)[0].status == "enqueued"


@pytest.mark.peers
def test_jobs_that_go_quiet_are_published_again(db, listener, settings, clock, assembler, publisher):
    assert storescu(listener, series_files(CT)[:2]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (job_id,) = assembler.tick()
    clock.advance(settings.job_redeliver_seconds + 1)  # the worker that took it died
    assembler.tick()
    assert publisher.published == [job_id, job_id]
    with db.session() as s:
        assert s.scalar(select(AuditEvent.action).where(AuditEvent.action == "job.reenqueued")) is not None


@pytest.mark.peers
def test_instances_no_model_reads_join_the_newest_version_without_a_job(db, listener, settings, clock, assembler, publisher, tmp_path):
    """A PACS that forwards the study back, our SR included, must not have it captioned again."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    files = series_files(CT)
    assert storescu(listener, files[:14]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (first_job,) = assembler.tick()
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    sr.StudyInstanceUID = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.save_as(tmp_path / "sr.dcm")
    assert storescu(listener, [tmp_path / "sr.dcm"]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    assert assembler.tick() == [] and publisher.published == [first_job], "no version, no job for an SR alone"
    (v1,) = versions(db)
    assert (v1.number, v1.instance_count, v1.captionable_count) == (1, 15, 14)
    with db.session() as s:
        assert set(s.scalars(select(Instance.version_number))) == {1}
        (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.nothing_new_to_caption"))
    assert (event.details["number"], event.details["new_instances"]) == (1, 1)

    assert storescu(listener, files[14:]).returncode == 0  # new images still make a new version
    clock.advance(settings.quiet_seconds + 1)
    (second_job,) = assembler.tick()
    v1, v2 = versions(db)
    assert (v2.number, v2.instance_count, v2.captionable_count) == (2, 29, 28)
    assert [j.id for j in jobs(db)] == [first_job, second_job]
