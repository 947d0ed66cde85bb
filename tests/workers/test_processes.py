"""The queue hand-off with real processes: `medcap serve` on the embedded default, and
`medcap listen` + `medcap worker` as separate processes on PostgreSQL and Redis."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import select

from service.database import Database
from service.schema import AuditEvent, Job
from tests.conftest import free_port, series_files, storescu, wait_until
from tests.processes import Process, run, settings_env

CT = series_files("ct-head-ge")[:6]
FAST = dict(quiet_seconds=1, max_wait_seconds=60, assembly_interval_seconds=0.2)


def job_statuses(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(Job.status).order_by(Job.id)))


def wait_listening(proc: Process, port: int) -> None:
    import socket

    def accepting() -> bool:
        assert proc.proc.poll() is None, f"process exited early:\n{proc.output()}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(accepting, "the listener to accept connections", timeout=60)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_serve_runs_listener_assembler_and_worker_on_the_embedded_default(make_settings, tmp_path):
    settings = make_settings(database_url="", broker_url="", **FAST)  # SQLite + embedded broker under the data dir
    env = settings_env(settings)
    env.pop("MEDCAP_DATABASE_URL"), env.pop("MEDCAP_BROKER_URL")
    serve = Process(["serve"], env, tmp_path / "serve.log")
    try:
        wait_listening(serve, settings.dicom_port)
        assert storescu(settings.dicom_port, CT).returncode == 0
        db = Database(settings.effective_database_url)
        wait_until(lambda: job_statuses(db) == ["succeeded"], "the job to be run by the worker", timeout=60)
        with db.session() as s:
            acts = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
            worker_actor = s.scalar(select(AuditEvent.actor).where(AuditEvent.action == "job.succeeded"))
        assert acts == ["association.accepted", "study.receiving", "association.ended", "study.version_created",
                        "job.created", "job.enqueued", "job.started", "job.succeeded"]  # fmt: skip
        assert worker_actor.startswith("worker:")
        db.dispose()
    finally:
        serve.stop()
    assert "Traceback" not in serve.output()


@pytest.fixture
def redis_url():  # type: ignore[no-untyped-def]
    url = "redis://127.0.0.1:6379/11"  # a database number of the tests' own
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_listener_and_worker_as_separate_processes_on_postgresql_and_redis(make_settings, redis_url, tmp_path):
    settings = make_settings(broker_url=redis_url, **FAST)
    env = settings_env(settings)
    listen = Process(["listen"], env, tmp_path / "listen.log")
    worker = None
    try:
        wait_listening(listen, settings.dicom_port)
        assert storescu(settings.dicom_port, CT).returncode == 0
        db = Database(settings.effective_database_url)
        # No worker yet: the job waits in the broker.
        wait_until(lambda: job_statuses(db) == ["enqueued"], "the job to be enqueued", timeout=30)
        assert redis.Redis.from_url(redis_url).llen("caption") == 1
        worker = Process(["worker"], env, tmp_path / "worker.log")
        wait_until(lambda: job_statuses(db) == ["succeeded"], "the worker to run the job", timeout=60)
        db.dispose()
    finally:
        listen.stop()
        if worker:
            worker.stop()
    assert "Traceback" not in listen.output()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_refuses_to_start_on_an_unmigrated_database(make_settings, tmp_path):
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'empty.sqlite'}", dicom_port=free_port())
    result = run(["worker"], settings_env(settings), timeout=60)
    assert result.returncode == 1 and "medcap db upgrade" in result.stderr
