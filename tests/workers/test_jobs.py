"""Job claims: a job runs once, however often it is delivered."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from service.schema import AuditEvent, Job, Study, StudyVersion
from workers.jobs import JobRunner


@pytest.fixture
def job_id(db, clock) -> int:
    now = clock.now()
    with db.session() as s:
        study = Study(study_uid="1.2.3", first_received_at=now)
        s.add(study)
        s.flush()
        version = StudyVersion(study_id=study.id, number=1, created_at=now, trigger="stable", instance_count=1, captionable_count=1)
        s.add(version)
        s.flush()
        job = Job(study_version_id=version.id, status="enqueued", created_at=now, attempts=0)
        s.add(job)
        s.flush()
        return job.id


@pytest.fixture
def runner(db, clock) -> JobRunner:
    return JobRunner(db, clock, "worker:test", stale_seconds=900)


def status(db, job_id: int) -> tuple[str, int]:
    with db.session() as s:
        job = s.get(Job, job_id)
        return job.status, job.attempts


def test_a_redelivered_job_runs_once(db, runner, job_id):
    assert runner.run(job_id) == "succeeded"
    assert runner.run(job_id) == "skipped"
    assert status(db, job_id) == ("succeeded", 1)
    with db.session() as s:
        acts = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
        started = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.started")).one()
    assert acts == ["job.started", "job.succeeded", "job.skipped"]
    assert started.study_uid == "1.2.3" and started.actor == "worker:test"


def test_a_superseded_job_does_not_run(db, runner, job_id):
    with db.session() as s:
        s.execute(update(Job).values(status="superseded"))
    assert runner.run(job_id) == "skipped"
    assert status(db, job_id) == ("superseded", 0)


def test_a_running_job_is_not_taken_twice_until_it_goes_stale(db, runner, clock, job_id):
    assert runner.claim(job_id)
    assert not runner.claim(job_id), "another worker is on it"
    clock.advance(901)  # that worker died
    assert runner.claim(job_id)
    assert status(db, job_id) == ("running", 2)


def test_superseded_while_running_stays_superseded(db, runner, job_id):
    assert runner.claim(job_id)
    with db.session() as s:
        s.execute(update(Job).values(status="superseded"))
    runner.finish(job_id)
    assert status(db, job_id)[0] == "superseded"


def test_failure_is_recorded_with_its_reason(db, runner, job_id):
    assert runner.claim(job_id)
    runner.finish(job_id, error="model crashed")
    with db.session() as s:
        job = s.get(Job, job_id)
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.failed")).one()
    assert (job.status, job.error) == ("failed", "model crashed")
    assert event.details["error"] == "model crashed"
    assert job.finished_at is not None
