"""Prometheus metrics: the audit database read at scrape time (SQLite and PostgreSQL), scraped over
HTTP and parsed as Prometheus would, after real work by the listener, assembler, job and dispatch
runners; the workers' task metrics in multiprocess mode; a database that goes away."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select, text

from service import prometheus
from service.reports import resend_report
from service.schema import Dispatch, DispatchStatus, Job, JobStatus, Output, SRDocument
from tests.conftest import PG_ADMIN_URL, free_port, storescu
from tests.pipeline import MR, make_drafter, runner
from tests.processes import run, settings_env
from tests.workers import test_dispatching
from tests.workers.test_dispatching import dispatcher
from workers.drafting import PermanentJobError

storescp = test_dispatching.storescp  # the fixture: dcmtk's storescp as the PACS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample on the endpoint, parsed with prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        body = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def endpoint(database_url: str) -> Iterator[int]:
    """The listener's registry (database collector) served on a port of its own."""
    registry = prometheus.service_registry(database_url)
    port = free_port()
    server = prometheus.serve(registry, port)
    assert server is not None
    yield port
    server.shutdown()
    server.server_close()
    for collector in list(registry._collector_to_names):
        if isinstance(collector, prometheus.DatabaseCollector):
            collector.close()


@pytest.mark.peers
def test_the_pipeline_state_is_read_from_the_database_at_each_scrape(
    db, clock, settings, listener, assembler, captioner, job_id, storescp, endpoint
):
    # A second study (MR) arrives and becomes a job of its own, 31 s after the CT's job was created.
    assert storescu(listener, MR).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (mr_job,) = assembler.tick()
    m = scrape(endpoint)
    assert value(m, "medcap_database_up") == 1
    assert value(m, "medcap_instances_received_total") == 8 + 6
    assert value(m, "medcap_jobs", status="enqueued") == 2 and value(m, "medcap_jobs", status="succeeded") == 0
    assert value(m, "medcap_queue_depth", queue="caption") == 2 and value(m, "medcap_queue_depth", queue="dispatch") == 0
    assert value(m, "medcap_job_failures_total") == 0 and value(m, "medcap_dispatch_failures_total") == 0
    assert value(m, "medcap_job_duration_seconds_count") == 0 and value(m, "medcap_pipeline_seconds_count") == 0

    # The CT job takes 12 s (on the test clock) and drafts an SR for the storescp; the MR job fails for good.
    destination = f"PACS@127.0.0.1:{storescp.port}"
    drafter = make_drafter(db, clock, captioner, settings, destinations=[destination])

    def slow_draft(claimed: int) -> str:
        clock.advance(12)
        return drafter.draft(claimed)

    def broken(claimed: int) -> str:
        raise PermanentJobError("no captionable series")

    assert runner(db, clock).run(job_id, slow_draft) == "succeeded"
    assert runner(db, clock).run(mr_job, broken) == "failed"
    m = scrape(endpoint)
    assert (value(m, "medcap_jobs", status="succeeded"), value(m, "medcap_jobs", status="failed")) == (1, 1)
    assert value(m, "medcap_queue_depth", queue="caption") == 0 and value(m, "medcap_queue_depth", queue="dispatch") == 1
    assert value(m, "medcap_dispatches", status="pending") == 1
    assert value(m, "medcap_job_failures_total") == 1
    assert value(m, "medcap_job_duration_seconds_count") == 1 and value(m, "medcap_job_duration_seconds_sum") == pytest.approx(12, abs=1e-3)
    assert value(m, "medcap_job_duration_seconds_bucket", le="10.0") == 0
    assert value(m, "medcap_job_duration_seconds_bucket", le="20.0") == 1
    assert value(m, "medcap_job_duration_seconds_bucket", le="+Inf") == 1

    # The PACS is down and we allow one attempt: the dispatch fails. Then it is resent and delivered, 100 s later.
    with db.session() as s:
        dispatch_id, sr_uid = s.execute(
            select(Dispatch.id, SRDocument.sop_instance_uid).select_from(Dispatch).join(Output).join(SRDocument)
        ).one()
    assert dispatcher(db, clock, settings, max_attempts=1).run(dispatch_id) == "failed"
    m = scrape(endpoint)
    assert value(m, "medcap_dispatches", status="failed") == 1 and value(m, "medcap_dispatch_failures_total") == 1
    assert value(m, "medcap_queue_depth", queue="dispatch") == 0

    clock.advance(100)
    assert resend_report(db, clock, sr_uid, [destination], "cli:test") == [destination]
    assert value(scrape(endpoint), "medcap_queue_depth", queue="dispatch") == 1
    storescp.start()
    assert dispatcher(db, clock, settings).run(dispatch_id) == "delivered"
    m = scrape(endpoint)
    assert value(m, "medcap_dispatches", status="delivered") == 1 and value(m, "medcap_dispatches", status="failed") == 0
    assert value(m, "medcap_dispatch_failures_total") == 1, "a counter of failures, not of dispatches failed now"
    with db.session() as s:
        job = s.get(Job, job_id)
    assert (job.acknowledged_at - job.created_at).total_seconds() == pytest.approx(31 + 12 + 100)
    assert value(m, "medcap_pipeline_seconds_count") == 1 and value(m, "medcap_pipeline_seconds_sum") == pytest.approx(143, abs=1e-3)
    assert value(m, "medcap_pipeline_seconds_bucket", le="120.0") == 0
    assert value(m, "medcap_pipeline_seconds_bucket", le="300.0") == 1
    assert value(m, "medcap_job_duration_seconds_count") == 1, "the failed job has no duration"


def test_an_empty_database_exports_zeros_for_every_status(endpoint):
    m = scrape(endpoint)
    assert value(m, "medcap_database_up") == 1 and value(m, "medcap_instances_received_total") == 0
    assert {labels for (name, labels) in m if name == "medcap_jobs"} == {(("status", s),) for s in JobStatus}
    assert {labels for (name, labels) in m if name == "medcap_dispatches"} == {(("status", s),) for s in DispatchStatus}
    assert value(m, "medcap_pipeline_seconds_bucket", le="+Inf") == 0 and value(m, "medcap_pipeline_seconds_sum") == 0


def test_a_database_that_goes_away_is_reported_and_the_endpoint_keeps_answering(database_url, endpoint, caplog):
    assert value(scrape(endpoint), "medcap_database_up") == 1
    if database_url.startswith("sqlite"):
        path = Path(database_url.split("///", 1)[1])
        shutil.move(path, path.with_suffix(".gone"))
    else:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{database_url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        admin.dispose()
    with caplog.at_level(logging.WARNING, logger="service.prometheus"):
        for _ in range(2):
            m = scrape(endpoint)
            assert value(m, "medcap_database_up") == 0
            assert value(m, "medcap_jobs", status="queued") is None, "no stale or made-up values"
    assert "cannot read the audit database" in caplog.text
    assert value(m, "process_cpu_seconds_total") is not None


@pytest.fixture
def multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Multiprocess mode in this process, as `medcap worker` sets it up, undone afterwards."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv(prometheus.MULTIPROC_ENV, str(directory))  # restored (removed) at teardown
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setattr(prometheus, "_task_metrics", None)
    prometheus.use_multiprocess_dir(str(directory))
    yield directory


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_task_outcomes_and_durations_are_counted_across_processes(db, multiprocess_dir):
    @prometheus.timed_task("medcap.send_report")
    def send(dispatch_id: int) -> str:
        if dispatch_id < 0:
            raise ConnectionError("broker gone")
        return "delivered" if dispatch_id else "skipped"

    assert [send(1), send(2), send(0)] == ["delivered", "delivered", "skipped"]
    with pytest.raises(ConnectionError):
        send(-1)
    pid = os.fork()  # a pool process of its own, as Celery's prefork pool runs tasks
    if pid == 0:
        try:
            send(3)
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert len(list(multiprocess_dir.glob("*.db"))) >= 2, "one file per process"

    port = free_port()
    server = prometheus.serve(prometheus.service_registry(db.url, str(multiprocess_dir)), port)
    assert server is not None
    try:
        m = scrape(port)
    finally:
        server.shutdown()
        server.server_close()
    assert value(m, "medcap_worker_tasks_total", task="medcap.send_report", outcome="delivered") == 3
    assert value(m, "medcap_worker_tasks_total", task="medcap.send_report", outcome="skipped") == 1
    assert value(m, "medcap_worker_tasks_total", task="medcap.send_report", outcome="error") == 1
    assert value(m, "medcap_worker_task_seconds_count", task="medcap.send_report") == 5
    assert value(m, "medcap_worker_task_seconds_bucket", task="medcap.send_report", le="+Inf") == 5
    assert value(m, "medcap_database_up") == 1, "the worker's endpoint also carries the database's metrics"


def test_the_decorated_task_keeps_its_signature_for_celery():
    from celery.utils.functional import head_from_fun

    from workers.tasks import caption_study, deliver_output

    for task in (caption_study, deliver_output):
        check = head_from_fun(task.run)
        check(1)
        with pytest.raises(TypeError):
            check()


def test_port_0_serves_nothing():
    assert prometheus.serve(prometheus.service_registry("sqlite:////nonexistent/medcap.sqlite"), 0) is None


@pytest.mark.processes
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_listen_refuses_to_start_on_a_metrics_port_that_is_taken(settings):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(["listen"], settings_env(settings, MEDCAP_METRICS_PORT=str(port)), timeout=60)
    assert result.returncode == 1 and f"cannot serve metrics on port {port}" in result.stderr, result.stderr
