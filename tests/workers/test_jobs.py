"""Job claims, retries and failures: a job runs once however often it is delivered, a transient
failure comes back after a backoff, and a job that keeps failing ends visibly failed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from service.reports import RequeueError, list_reports, retry_job
from service.schema import AuditEvent, Job, Study, StudyVersion
from tests.conftest import RecordingPublisher, make_assembler
from workers.drafting import PermanentJobError
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
    return JobRunner(db, clock, "worker:test", lease_seconds=900, max_attempts=3, retry_delay=lambda attempts: 10.0 * 2 ** (attempts - 1))


def succeed(job_id: int) -> str:
    return "succeeded"  # the real work (tests/workers/test_drafting.py) commits the job's success itself


def status(db, job_id: int) -> tuple[str, int]:
    with db.session() as s:
        job = s.get(Job, job_id)
        return job.status, job.attempts


def test_a_redelivered_job_runs_once(db, runner, job_id):
    runs: list[int] = []

    def work(claimed: int) -> str:
        runs.append(claimed)
        runner.finish(claimed)
        return "succeeded"

    assert runner.run(job_id, work) == "succeeded"
    assert runner.run(job_id, work) == "skipped"
    assert runs == [job_id] and status(db, job_id) == ("succeeded", 1)
    with db.session() as s:
        acts = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
        started = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.started")).one()
    assert acts == ["job.started", "job.succeeded", "job.skipped"]
    assert started.study_uid == "1.2.3" and started.actor == "worker:test"


def test_a_superseded_job_does_not_run(db, runner, job_id):
    with db.session() as s:
        s.execute(update(Job).values(status="superseded"))
    assert runner.run(job_id, succeed) == "skipped"
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


def crash(job_id: int) -> str:
    raise OSError("CUDA out of memory (or the database went away)")


def test_a_transient_failure_comes_back_after_a_growing_backoff_then_fails(db, runner, clock, job_id, settings):
    assembler = make_assembler(db, clock, settings, publisher := RecordingPublisher())
    assert runner.run(job_id, crash) == "retrying"
    with db.session() as s:
        job = s.get(Job, job_id)
    assert (job.status, job.attempts) == ("queued", 1) and "out of memory" in job.error
    assert job.not_before == clock.now() + timedelta(seconds=10)
    assert assembler.publish_pending() == 0, "not before the backoff has passed"
    clock.advance(10)
    assert assembler.publish_pending() == 1 and publisher.published == [job_id]
    assert runner.run(job_id, crash) == "retrying"
    with db.session() as s:
        assert s.get(Job, job_id).not_before == clock.now() + timedelta(seconds=20)
    clock.advance(20)
    assert runner.run(job_id, crash) == "failed"
    with db.session() as s:
        job = s.get(Job, job_id)
        acts = list(s.scalars(select(AuditEvent.action).where(AuditEvent.object_type == "job").order_by(AuditEvent.id)))
    assert (job.status, job.attempts) == ("failed", 3) and "out of memory" in job.error
    assert acts == ["job.started", "job.retry_scheduled", "job.enqueued", "job.started", "job.retry_scheduled", "job.started", "job.failed"]
    (report,) = list_reports(db, failed_only=True)
    assert (report.job_id, report.job_status) == (job_id, "failed") and "out of memory" in report.job_error


def test_a_permanent_error_fails_at_once_and_retry_queues_it_again(db, runner, clock, job_id):
    def unreadable(job_id: int) -> str:
        raise PermanentJobError("cannot read the study's images: not DICOM")

    assert runner.run(job_id, unreadable) == "failed"
    assert status(db, job_id) == ("failed", 1)
    with pytest.raises(RequeueError, match="no job 999"):
        retry_job(db, clock, 999, "cli:test")
    retry_job(db, clock, job_id, "cli:test")
    assert status(db, job_id) == ("queued", 0)
    with pytest.raises(RequeueError, match="only failed jobs"):
        retry_job(db, clock, job_id, "cli:test")
    with db.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.retry_requested")).one()
    assert event.actor == "cli:test" and "not DICOM" in event.details["previous_error"]


def test_a_job_that_keeps_killing_its_worker_ends_failed(db, runner, clock, job_id):
    for _ in range(3):
        assert runner.claim(job_id)  # ...and the worker dies: no finish, no retry
        clock.advance(901)
    assert not runner.claim(job_id)
    with db.session() as s:
        job = s.get(Job, job_id)
    assert job.status == "failed" and "abandoned by a worker 3 times" in job.error
