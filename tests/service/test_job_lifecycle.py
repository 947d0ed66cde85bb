"""The job state machine: every allowed and every forbidden transition, claims with leases, take-overs."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import select

from service import job_lifecycle as jobs
from service.job_lifecycle import TRANSITIONS, ForbiddenTransition, JobEvent
from service.schema import AuditEvent, Job, JobStatus, Study, StudyVersion
from tests import rows

LEASE = timedelta(seconds=10)


def make_job(db, clock, status: JobStatus = JobStatus.ENQUEUED, **values) -> int:
    now = clock.now()
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == "1.2.3"))
        if study is None:
            study = rows.study(s, now, "1.2.3")
        number = (s.scalar(select(StudyVersion.number).order_by(StudyVersion.number.desc()).limit(1)) or 0) + 1
        version = rows.version(s, now, study, number)
        job = Job(study_version_id=version.id, status=status.value, created_at=now, **({"attempts": 0} | values))
        s.add(job)
        s.flush()
        return job.id


def job_status(db, job_id: int) -> str:
    with db.session() as s:
        return s.scalar(select(Job.status).where(Job.id == job_id))


@pytest.mark.parametrize("event", list(JobEvent))
@pytest.mark.parametrize("status", list(JobStatus))
def test_every_transition_is_allowed_or_refused_as_the_table_says(db, clock, status, event):
    sources, to = TRANSITIONS[event]
    job_id = make_job(db, clock, status)
    with db.session() as s:
        moved = jobs.apply(s, job_id, event)
    assert moved == (status in sources)
    assert job_status(db, job_id) == ((to or status) if moved else status)
    if status in sources:
        assert jobs.target(status, event) == (to or status)
    else:
        with pytest.raises(ForbiddenTransition):
            jobs.target(status, event)


def test_the_table_reads_as_the_diagram():
    allowed = {(event.value, source.value, (to or source).value) for event, (sources, to) in TRANSITIONS.items() for source in sources}
    assert allowed == {
        ("publish", "queued", "enqueued"),
        ("republish", "enqueued", "enqueued"),
        ("republish", "running", "running"),
        ("claim", "queued", "running"),
        ("claim", "enqueued", "running"),
        ("take_over", "running", "running"),
        ("renew", "running", "running"),
        ("succeed", "running", "succeeded"),
        ("fail", "running", "failed"),
        ("retry", "running", "queued"),
        ("supersede", "queued", "superseded"),
        ("supersede", "enqueued", "superseded"),
        ("supersede", "running", "superseded"),
        ("requeue", "failed", "queued"),
    }
    finals = {JobStatus.SUCCEEDED, JobStatus.SUPERSEDED}
    assert not any(source in finals for sources, _ in TRANSITIONS.values() for source in sources)  # nothing leaves them


def test_a_live_claim_is_not_taken_and_an_expired_one_is(db, clock):
    job_id = make_job(db, clock)
    with db.session() as s:
        assert jobs.claim(s, clock.now(), "worker:a", job_id, "host-a:1", LEASE).claimed
    with db.session() as s:
        assert not jobs.claim(s, clock.now(), "worker:b", job_id, "host-b:2", LEASE).claimed, "the lease is running"
    clock.advance(9)
    with db.session() as s:
        assert jobs.renew(s, clock.now(), job_id, "host-a:1", LEASE)  # the owner renews: 10 s more
        assert not jobs.renew(s, clock.now(), job_id, "host-b:2", LEASE), "only the owner renews"
    clock.advance(9)
    with db.session() as s:
        assert not jobs.claim(s, clock.now(), "worker:b", job_id, "host-b:2", LEASE).claimed, "renewed: still running"
    clock.advance(2)  # the owner stopped renewing: its lease is out
    with db.session() as s:
        claim = jobs.claim(s, clock.now(), "worker:b", job_id, "host-b:2", LEASE)
    assert claim.claimed and claim.took_over_from == "host-a:1" and claim.attempts == 2
    with db.session() as s:
        assert not jobs.succeed(s, clock.now(), "worker:a", job_id, owner="host-a:1", study_uid="1.2.3"), "the old owner lost it"
        assert jobs.succeed(s, clock.now(), "worker:b", job_id, owner="host-b:2", study_uid="1.2.3")
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.started").order_by(AuditEvent.id)).all()
    assert [e.details.get("took_over_from") for e in events] == [None, "host-a:1"]


def test_a_claim_whose_process_is_gone_is_taken_over_at_once(db, clock):
    """The crashed worker's redelivered task need not wait for the lease: the process is dead on this host."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = f"{socket.gethostname()}:{dead.stdout.strip()}"
    job_id = make_job(db, clock)
    with db.session() as s:
        assert jobs.claim(s, clock.now(), "worker:a", job_id, gone, LEASE).claimed
    with db.session() as s:
        claim = jobs.claim(s, clock.now(), "worker:b", job_id, jobs.this_process(), LEASE)  # the lease has 10 s to run
    assert claim.claimed and claim.took_over_from == gone
    # Only this host's processes can be seen: another host's claim waits for its lease.
    assert jobs.owner_is_dead(gone) and not jobs.owner_is_dead(jobs.this_process())
    assert not jobs.owner_is_dead(f"another-host:{dead.stdout.strip()}") and not jobs.owner_is_dead(None)


def test_two_racing_take_overs_make_one_owner(db, clock):
    job_id = make_job(db, clock)
    with db.session() as s:
        jobs.claim(s, clock.now(), "worker:a", job_id, "host-a:1", LEASE)
    clock.advance(11)
    with db.session() as first, db.session() as second:
        one = jobs.claim(first, clock.now(), "worker:b", job_id, "host-b:2", LEASE)
        first.commit()
        two = jobs.claim(second, clock.now(), "worker:c", job_id, "host-c:3", LEASE)
    assert [one.claimed, two.claimed] == [True, False]


def test_an_operator_requeues_only_failed_jobs(db, clock):
    job_id = make_job(db, clock, JobStatus.SUCCEEDED)
    with db.session() as s, pytest.raises(ForbiddenTransition, match="a succeeded job cannot requeue"):
        jobs.requeue(s, clock.now(), "cli:test", job_id)
    failed = make_job(db, clock, JobStatus.FAILED, attempts=3, error="boom", claimed_by="host-a:1")
    with db.session() as s:
        jobs.requeue(s, clock.now(), "cli:test", failed)
    with db.session() as s:
        job = s.get(Job, failed)
        assert (job.status, job.attempts, job.claimed_by) == ("queued", 0, None)
    with db.session() as s, pytest.raises(LookupError):
        jobs.requeue(s, clock.now(), "cli:test", 9999)
