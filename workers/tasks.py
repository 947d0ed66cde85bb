"""Celery tasks. Each is a thin shell around code that runs (and is tested) without Celery."""

from __future__ import annotations

import logging
import socket

from service import audit
from service.clock import SystemClock
from service.database import Database
from service.settings import Settings, load_settings
from workers.celery_app import CAPTION_TASK, app, configure
from workers.jobs import JobRunner

LOG = logging.getLogger(__name__)
_db: Database | None = None


def _database(settings: Settings) -> Database:
    # One engine per worker process, created after the fork.
    global _db
    if _db is None:
        _db = Database(settings.effective_database_url)
    return _db


@app.task(name=CAPTION_TASK, acks_late=True, reject_on_worker_lost=True)
def caption_study(job_id: int) -> str:
    # Set by `medcap worker`; a worker started with `celery -A workers.celery_app` reads the environment.
    settings: Settings = getattr(app, "medcap_settings", None) or configure(load_settings()).medcap_settings  # type: ignore[attr-defined]
    runner = JobRunner(_database(settings), SystemClock(), audit.worker_actor(socket.gethostname()), settings.job_redeliver_seconds)
    outcome = runner.run(job_id)
    LOG.info("job %d: %s", job_id, outcome)
    return outcome
