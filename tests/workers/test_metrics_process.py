"""Prometheus metrics of real ``medcap`` processes: a dispatch worker whose prefork pool sends an SR
to a storescp through the real Celery broker, ``medcap serve`` serving its workers' metrics on its
own port, and ``medcap listen`` counting what it received."""

from __future__ import annotations

import os
import re
import signal
import urllib.error
from pathlib import Path

import pytest
from celery import Celery

from service.settings import Settings
from tests.conftest import free_port, make_assembler, series_files, storescu, wait_until
from tests.processes import Process, settings_env
from tests.service.test_prometheus import Samples, scrape, value
from tests.workers import test_dispatching
from tests.workers.test_dispatching import draft_for
from tests.workers.test_processes import FAST, pipeline_env, wait_listening
from workers.celery_app import CeleryPublisher
from workers.embedded_broker import kombu_url

storescp = test_dispatching.storescp  # the fixture: dcmtk's storescp as the PACS


def scraped(proc: Process, port: int, condition) -> Samples:
    """Scrape ``port`` until ``condition(samples)`` holds; the process must stay up meanwhile."""
    last: dict[str, Samples] = {}

    def ready() -> bool:
        assert proc.proc.poll() is None, f"process exited early:\n{proc.output()[-3000:]}"
        try:
            last["samples"] = scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return False
        return bool(condition(last["samples"]))

    wait_until(ready, f"the metrics on port {port}", timeout=90, interval=0.2)
    return last["samples"]


def metrics_dir(output: str) -> Path:
    found = re.search(r"metrics on 0\.0\.0\.0:\d+ \((?:pool processes|workers) write to (\S+)\)", output)
    assert found, output[-3000:]
    return Path(found.group(1))


@pytest.mark.peers
@pytest.mark.processes
def test_a_dispatch_worker_counts_the_sends_of_its_pool_processes(db, clock, settings: Settings, captioner, job_id, storescp, tmp_path):
    storescp.start()
    doc = draft_for(db, clock, settings, captioner, job_id, f"PACS@127.0.0.1:{storescp.port}")
    port = free_port()
    worker = Process(
        ["worker", "--queues", "dispatch", "--concurrency", "2"],
        settings_env(settings, MEDCAP_WORKER_METRICS_PORT=str(port)),
        tmp_path / "worker.log",
    )
    try:
        before = scraped(worker, port, lambda m: value(m, "medcap_database_up") == 1)
        assert value(before, "medcap_dispatches", status="pending") == 1
        assert value(before, "medcap_worker_tasks_total", task="medcap.send_report", outcome="delivered") is None

        # Published by the assembler through the real broker, as in `medcap listen` (with a Celery app of
        # the test's own: the module's app keeps a connection pool to the broker it was first configured with).
        with Celery("test-producer", broker=kombu_url(settings.effective_broker_url), set_as_current=False) as producer:
            assert make_assembler(db, clock, settings, CeleryPublisher(producer)).publish_dispatches() == 1  # type: ignore[arg-type]
        after = scraped(worker, port, lambda m: value(m, "medcap_dispatches", status="delivered") == 1)
        after = scraped(
            worker, port, lambda m: (value(m, "medcap_worker_tasks_total", task="medcap.send_report", outcome="delivered") or 0) >= 1
        )
        assert value(after, "medcap_worker_task_seconds_count", task="medcap.send_report") >= 1
        assert value(after, "medcap_queue_depth", queue="dispatch") == 0
        assert value(after, "process_resident_memory_bytes") is not None
        assert [p.name.split(".", 1)[1] for p in storescp.directory.iterdir()] == [doc.sop_instance_uid]
        directory = metrics_dir(worker.output())
        assert directory.is_dir() and list(directory.glob("*.db"))
        os.kill(worker.proc.pid, signal.SIGTERM)  # the main process only: a warm shutdown, pool processes included
        assert worker.proc.wait(timeout=60) == 0
    finally:
        worker.stop()
    assert not directory.exists(), "the worker removes its metrics directory when it stops"
    assert "Traceback" not in worker.output()


@pytest.mark.peers
@pytest.mark.processes
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_serve_serves_its_workers_task_metrics_on_its_own_port(make_settings, tmp_path, tiny_model, storescp):
    storescp.start()
    settings = make_settings(database_url="", broker_url="", **FAST)  # the embedded default
    port, unused_worker_port = free_port(), free_port()
    env = pipeline_env(
        settings,
        tiny_model,
        f"PACS@127.0.0.1:{storescp.port}",
        MEDCAP_METRICS_PORT=str(port),
        MEDCAP_WORKER_METRICS_PORT=str(unused_worker_port),
    )
    env.pop("MEDCAP_DATABASE_URL"), env.pop("MEDCAP_BROKER_URL")
    serve = Process(["serve"], env, tmp_path / "serve.log")
    try:
        wait_listening(serve, settings.dicom_port)
        assert storescu(settings.dicom_port, series_files("ct-head-ge")[:4]).returncode == 0

        def done(m: Samples) -> bool:
            return (
                value(m, "medcap_worker_tasks_total", task="medcap.caption_study", outcome="succeeded") == 1
                and value(m, "medcap_worker_tasks_total", task="medcap.send_report", outcome="delivered") == 1
                # one scrape reads the database before the workers' counters: wait for a snapshot after the delivery
                and value(m, "medcap_pipeline_seconds_count") == 1
            )

        m = scraped(serve, port, done)
        assert value(m, "medcap_instances_received_total") == 4 and value(m, "medcap_jobs", status="succeeded") == 1
        assert value(m, "medcap_pipeline_seconds_count") == 1 and value(m, "medcap_job_duration_seconds_count") == 1
        directory = metrics_dir(serve.output())
        os.kill(serve.proc.pid, signal.SIGTERM)  # serve stops its workers itself
        assert serve.proc.wait(timeout=90) == 0
    finally:
        serve.stop()
    assert not directory.exists(), "serve removes the workers' metrics directory when it stops"
    output = serve.output()
    assert "service/prometheus.py" not in output and "cannot serve metrics" not in output, output[-3000:]
    assert f":{unused_worker_port} " not in output, "the workers of `serve` leave their own metrics port off"


@pytest.mark.peers
@pytest.mark.processes
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_listen_serves_the_database_metrics(make_settings, tmp_path):
    settings = make_settings(**FAST)
    port = free_port()
    listen = Process(["listen"], settings_env(settings, MEDCAP_METRICS_PORT=str(port)), tmp_path / "listen.log")
    try:
        wait_listening(listen, settings.dicom_port)
        assert value(scraped(listen, port, lambda m: True), "medcap_instances_received_total") == 0
        assert storescu(settings.dicom_port, series_files("mr-t1-brain-uih")[:3]).returncode == 0
        m = scraped(listen, port, lambda m: value(m, "medcap_instances_received_total") == 3)
        assert value(m, "medcap_database_up") == 1
        scraped(listen, port, lambda m: value(m, "medcap_queue_depth", queue="caption") == 1)  # no worker: the job waits
    finally:
        listen.stop()
    assert "Traceback" not in listen.output()
