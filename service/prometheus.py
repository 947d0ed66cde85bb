"""Prometheus metrics.

Two sources:

* :class:`DatabaseCollector` reads the pipeline's state from the audit database at scrape time.
  All state lives there, so every process that serves it (the listener, ``medcap serve``, each
  worker) reports the same truth, across restarts and machines. The queries are counts on
  indexed columns, plus two aggregate queries for the latency histograms, which are computed in
  SQL over *all* jobs (not a recent window): bucket counts then only grow, as a Prometheus
  histogram's must, and ``rate()`` over them gives recent latencies. A database that cannot be
  read at scrape time is logged and exported as ``medcap_database_up 0``; it never stops the process.
* The workers' own counters (:func:`timed_task`): tasks run, their outcome and duration. Celery's
  prefork pool runs tasks in child processes, so these use prometheus_client's multiprocess mode:
  ``medcap worker`` gives its children a fresh directory (:func:`use_multiprocess_dir`) before the
  pool forks, and its HTTP server (in the parent) reads it; ``medcap serve`` does the same for the
  workers it starts, on its own port.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from sqlalchemy import Connection, Engine, case, create_engine, event, extract, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement

from service.audit import Action
from service.schema import AuditEvent, Dispatch, DispatchStatus, Instance, Job, JobStatus
from service.settings import Settings

LOG = logging.getLogger(__name__)
P = ParamSpec("P")

METRICS_ADDRESS = "0.0.0.0"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Claim to finish of one caption job: seconds on a GPU, minutes on a CPU.
JOB_DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
# Job created (the study became stable) to every destination acknowledged: includes queueing and retries.
PIPELINE_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
# One Celery task: a send (sub-second to a few network timeouts) or a caption job.
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CAPTION_QUEUED = (JobStatus.QUEUED, JobStatus.ENQUEUED)
DISPATCH_QUEUED = (DispatchStatus.PENDING, DispatchStatus.ENQUEUED, DispatchStatus.RETRYING)


# -- the audit database, read at scrape time ---------------------------------------------------


class DatabaseCollector:
    """The pipeline's state from the audit database, queried on every scrape (in one read snapshot)."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        ref = weakref.ref(self)

        # A forked child (a Celery pool process) must not share the parent's connections.
        def forget_in_child() -> None:
            collector = ref()
            if collector is not None:
                collector._forget()

        os.register_at_fork(after_in_child=forget_in_child)

    def collect(self) -> Iterator[Metric]:
        metrics: list[Metric] = []
        up = 0
        try:
            with self._connect() as conn:
                metrics = list(self._read(conn))
            up = 1
        except Exception as exc:  # the scrape must answer, and the process must keep running
            LOG.warning("metrics: cannot read the audit database: %s", exc)
        yield GaugeMetricFamily("medcap_database_up", "Whether the audit database could be read at this scrape.", value=up)
        yield from metrics

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _forget(self) -> None:
        if self._engine is not None:
            self._engine.dispose(close=False)
            self._engine = None

    def _connect(self) -> Connection:
        with self._lock:
            if self._engine is None:
                self._engine = _read_engine(self.url)
            return self._engine.connect()

    def _read(self, conn: Connection) -> Iterator[Metric]:
        dialect = conn.dialect.name
        instances = conn.scalar(select(func.count()).select_from(Instance)) or 0
        yield CounterMetricFamily(
            "medcap_instances_received", "DICOM instances received and stored (rows in the instances table).", value=instances
        )

        jobs = _counts(conn, Job.status, [s.value for s in JobStatus])
        gauge = GaugeMetricFamily("medcap_jobs", "Caption jobs by status.", labels=["status"])
        for status, count in jobs.items():
            gauge.add_metric([status], count)
        yield gauge

        dispatches = _counts(conn, Dispatch.status, [s.value for s in DispatchStatus])
        gauge = GaugeMetricFamily("medcap_dispatches", "SR dispatches (one SR to one destination) by status.", labels=["status"])
        for status, count in dispatches.items():
            gauge.add_metric([status], count)
        yield gauge

        gauge = GaugeMetricFamily(
            "medcap_queue_depth",
            "Work waiting: caption = jobs queued or enqueued; dispatch = dispatches pending, enqueued or retrying.",
            labels=["queue"],
        )
        gauge.add_metric(["caption"], sum(jobs[s] for s in CAPTION_QUEUED))
        gauge.add_metric(["dispatch"], sum(dispatches[s] for s in DISPATCH_QUEUED))
        yield gauge

        failures = _counts(conn, AuditEvent.action, [Action.JOB_FAILED.value, Action.DISPATCH_FAILED.value])
        yield CounterMetricFamily(
            "medcap_job_failures", "Caption jobs that ended failed (audit events job.failed).", value=failures[Action.JOB_FAILED]
        )
        yield CounterMetricFamily(
            "medcap_dispatch_failures",
            "Dispatches that ended failed (audit events dispatch.failed).",
            value=failures[Action.DISPATCH_FAILED],
        )

        yield _histogram(
            conn,
            "medcap_job_duration_seconds",
            "Claim to finish of succeeded caption jobs (finished_at - started_at), all jobs.",
            _seconds(dialect, Job.started_at, Job.finished_at),
            (Job.status == JobStatus.SUCCEEDED, Job.started_at.is_not(None), Job.finished_at.is_not(None)),
            JOB_DURATION_BUCKETS,
        )
        yield _histogram(
            conn,
            "medcap_pipeline_seconds",
            "Job created to SR acknowledged by every destination (acknowledged_at - created_at), all jobs.",
            _seconds(dialect, Job.created_at, Job.acknowledged_at),
            (Job.acknowledged_at.is_not(None),),
            PIPELINE_BUCKETS,
        )


def _read_engine(url: str) -> Engine:
    """An engine of the collector's own: it never takes a write lock and stays small."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if not path or path == ":memory:":
            raise ValueError("metrics need a file or server database")
        # mode=rw: an absent file is an error, not a new empty database.
        uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw"
        engine = create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=10, check_same_thread=False), poolclass=NullPool
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")  # deferred: a read snapshot that never blocks writers (WAL)

        return engine
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=1,
        max_overflow=2,
        isolation_level="REPEATABLE READ",
        connect_args={"connect_timeout": 5, "options": "-c statement_timeout=10000"},
    )


def _counts(conn: Connection, column: Any, keys: Sequence[str]) -> dict[str, int]:
    """Rows per value of an indexed column, every one of ``keys`` present (0 if none)."""
    counts = dict.fromkeys(keys, 0)
    for key, count in conn.execute(select(column, func.count()).where(column.in_(keys)).group_by(column)):
        counts[key] = int(count)
    return counts


def _seconds(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    if dialect == "sqlite":  # stored as ISO text in UTC
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return extract("epoch", end - start)


def _histogram(
    conn: Connection,
    name: str,
    documentation: str,
    seconds: ColumnElement[Any],
    where: Sequence[ColumnElement[bool]],
    buckets: Sequence[float],
) -> HistogramMetricFamily:
    durations = select(seconds.label("d")).where(*where).subquery()
    d = durations.c.d
    row = conn.execute(
        select(
            func.count(), func.coalesce(func.sum(d), 0), *(func.coalesce(func.sum(case((d <= bound, 1), else_=0)), 0) for bound in buckets)
        )
    ).one()
    count, total, cumulative = int(row[0]), float(row[1]), [int(v) for v in row[2:]]
    pairs = [(floatToGoString(bound), n) for bound, n in zip(buckets, cumulative, strict=True)] + [("+Inf", count)]
    return HistogramMetricFamily(name, documentation, buckets=pairs, sum_value=total)


# -- the workers' tasks, counted in the process that runs them ------------------------------------

_task_metrics: tuple[Counter, Histogram] | None = None
_task_metrics_lock = threading.Lock()


def use_multiprocess_dir(directory: str) -> None:
    """This process and its children (forked later) record task metrics as files in ``directory``."""
    global _task_metrics
    os.environ[MULTIPROC_ENV] = directory
    # prometheus_client picks its value class when first imported; metrics made from now on use files.
    values.ValueClass = values.get_value_class()
    with _task_metrics_lock:
        _task_metrics = None


def fresh_multiprocess_dir() -> str:
    """An empty directory for multiprocess metrics, removed when this process exits (not its children)."""
    directory = tempfile.mkdtemp(prefix="medcap-metrics-")
    atexit.register(_remove_dir, directory, os.getpid())
    return directory


def _remove_dir(directory: str, owner: int, **_: object) -> None:
    if os.getpid() == owner:  # a forked child inherits the exit handlers
        shutil.rmtree(directory, ignore_errors=True)


def _metrics() -> tuple[Counter, Histogram]:
    # Made on first use, in the pool process: after use_multiprocess_dir, whatever the import order.
    # Registered nowhere: in multiprocess mode the files are the registry (with the worker's metrics off, nothing reads them).
    global _task_metrics
    with _task_metrics_lock:
        if _task_metrics is None:
            _task_metrics = (
                Counter(
                    "medcap_worker_tasks",
                    "Celery tasks run by this worker, by outcome (what the task returned, or error).",
                    ["task", "outcome"],
                    registry=None,
                ),
                Histogram(
                    "medcap_worker_task_seconds",
                    "Duration of Celery tasks run by this worker.",
                    ["task"],
                    buckets=TASK_BUCKETS,
                    registry=None,
                ),
            )
        return _task_metrics


def record_task(task: str, outcome: str, seconds: float) -> None:
    try:
        tasks, durations = _metrics()
        tasks.labels(task=task, outcome=outcome).inc()
        durations.labels(task=task).observe(seconds)
    except Exception:  # metrics never fail a task
        LOG.exception("metrics: cannot record task %s", task)


def timed_task(task: str) -> Callable[[Callable[P, str]], Callable[P, str]]:
    """Count a task function's outcome (its return value, or ``error`` if it raised) and time it."""

    def decorate(fn: Callable[P, str]) -> Callable[P, str]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> str:
            started = time.perf_counter()
            outcome = "error"
            try:
                result = fn(*args, **kwargs)
                outcome = str(result)
                return result
            finally:
                record_task(task, outcome, time.perf_counter() - started)

        wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]  # Celery checks call arguments against it
        return wrapper

    return decorate


# -- the HTTP endpoint -----------------------------------------------------------------------------


def serve(registry: CollectorRegistry, port: int) -> WSGIServer | None:
    """Serve ``registry`` on 0.0.0.0:``port`` from a daemon thread; port 0 means off. Raises OSError if the port is taken."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=METRICS_ADDRESS, registry=registry)
    # A forked child (a Celery pool process) must not keep the listening socket open.
    os.register_at_fork(after_in_child=server.socket.close)
    return server


def service_registry(database_url: str, multiprocess_dir: str | None = None) -> CollectorRegistry:
    """The database collector and this process's own figures, plus the task metrics written to ``multiprocess_dir``."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(database_url))
    ProcessCollector(registry=registry)
    if multiprocess_dir is not None:
        MultiProcessCollector(registry, path=multiprocess_dir)
    return registry


def start_service(settings: Settings, *, children: bool) -> dict[str, str]:
    """For ``medcap listen`` and ``medcap serve``: the database collector on ``metrics_port``. With ``children``
    (``serve``), also the task metrics of the workers it starts; returns the environment to start them with
    (their own port off: two workers on one port would clash)."""
    env = {"MEDCAP_WORKER_METRICS_PORT": "0"}
    if not settings.metrics_port:
        return env
    directory = fresh_multiprocess_dir() if children else None
    serve(service_registry(settings.effective_database_url, directory), settings.metrics_port)
    if directory is not None:
        env[MULTIPROC_ENV] = directory
    LOG.info("metrics on %s:%d%s", METRICS_ADDRESS, settings.metrics_port, f" (workers write to {directory})" if directory else "")
    return env


def start_worker(settings: Settings) -> None:
    """For ``medcap worker``, before the pool forks: task metrics of the pool processes plus the database
    collector on ``worker_metrics_port``."""
    if not settings.worker_metrics_port:
        return
    from celery.signals import worker_shutdown

    directory = fresh_multiprocess_dir()
    # Also once the pool has stopped: the pool's own exit handler may hang on pool processes killed
    # with the worker (a process group's SIGTERM), and then the worker ends with SIGKILL.
    worker_shutdown.connect(functools.partial(_remove_dir, directory, os.getpid()), weak=False)
    use_multiprocess_dir(directory)
    serve(service_registry(settings.effective_database_url, directory), settings.worker_metrics_port)
    LOG.info("worker metrics on %s:%d (pool processes write to %s)", METRICS_ADDRESS, settings.worker_metrics_port, directory)
