"""Celery tasks. Each is a thin shell around code that runs (and is tested) without Celery."""

from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta
from typing import Any

from celery.signals import worker_process_init, worker_ready

from dicom_io.key_slices import KeySliceSpec
from service import audit, outputs, prometheus, routing
from service.clock import SystemClock
from service.database import Database
from service.settings import Settings, load_settings
from workers.celery_app import CAPTION_TASK, DISPATCH_TASK, app, configure
from workers.dispatching import DispatchRunner
from workers.drafting import Drafter, DraftOptions, PermanentJobError
from workers.jobs import JobRunner

LOG = logging.getLogger(__name__)
_db: Database | None = None
_captioner: Any = None
_batcher: Any = None
_captioner_lock = threading.Lock()
_rules: routing.RuleSet | None = None
_named: dict[str, Any] = {}  # the rule file's [models], by name, loaded when first chosen


def _settings() -> Settings:
    # Set by `medcap worker`; a worker started with `celery -A workers.celery_app` reads the environment.
    return getattr(app, "medcap_settings", None) or configure(load_settings()).medcap_settings


def _database(settings: Settings) -> Database:
    # One engine per worker process, created after the fork.
    global _db
    if _db is None:
        _db = Database(settings.effective_database_url)
    return _db


def captioner(settings: Settings) -> Any:
    """The model, loaded once per worker process and warmed up (after the fork: CUDA and
    OpenMP state do not survive one)."""
    global _captioner
    with _captioner_lock:
        if _captioner is None:
            if settings.model is None:
                raise PermanentJobError("no captioning model is configured (MEDCAP_MODEL)")
            import torch

            from models.captioner import Captioner

            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            LOG.info("loading the model from %s on %s (%d CPU threads)", settings.model, settings.device, torch.get_num_threads())
            loaded = Captioner.load(settings.model, settings.device)
            loaded.warm_up()
            LOG.info("model ready: %s", loaded.describe())
            _captioner = loaded
        return _captioner


def caption_model(settings: Settings) -> Any:
    """What caption tasks caption with: the model itself, or with several studies in flight (threads),
    a :class:`models.batching.CaptionBatcher` that puts their key images into shared batches."""
    global _batcher
    if settings.caption_studies_in_flight <= 1:
        return captioner(settings)
    with _captioner_lock:
        loaded = _batcher
    if loaded is None:
        from models.batching import CaptionBatcher

        model = captioner(settings)
        with _captioner_lock:
            if _batcher is None:
                _batcher = CaptionBatcher(model, max_images=settings.caption_batch_size, max_wait_ms=settings.caption_batch_wait_ms)
            loaded = _batcher
    return loaded


def routing_rules(settings: Settings) -> routing.RuleSet:
    """The routing rules, read once per worker process (`medcap worker` validated them before starting)."""
    global _rules
    with _captioner_lock:
        if _rules is None:
            try:
                _rules = routing.configured(settings)
            except routing.RoutingError as exc:
                raise PermanentJobError(f"routing rules: {exc}") from exc
        return _rules


def named_model(settings: Settings, name: str) -> Any:
    """A model the routing rules name (their file's [models] table), loaded once per worker process."""
    rules = routing_rules(settings)
    with _captioner_lock:
        if name not in _named:
            from models.captioner import Captioner

            LOG.info("loading model %s from %s on %s", name, rules.models[name], settings.device)
            loaded = Captioner.load(rules.models[name], settings.device)
            loaded.warm_up()
            _named[name] = loaded
        return _named[name]


def _load_model(**_: object) -> None:
    if getattr(app, "medcap_load_model", False):
        try:
            captioner(_settings())
        except Exception:
            LOG.exception("cannot load the model; caption jobs will fail and be retried")


@worker_process_init.connect
def _load_model_at_start(**kwargs: object) -> None:
    _load_model(**kwargs)  # each prefork pool process, after the fork


@worker_ready.connect
def _load_model_when_threaded(**kwargs: object) -> None:
    if getattr(app, "medcap_threads_pool", False):  # one process and its threads: load it there, once (never before a fork)
        _load_model(**kwargs)


def _actor() -> str:
    return audit.worker_actor(socket.gethostname())


@app.task(name=CAPTION_TASK, acks_late=True, reject_on_worker_lost=True)
@prometheus.timed_task(CAPTION_TASK)
def caption_study(job_id: int) -> str:
    settings = _settings()
    db = _database(settings)
    runner = JobRunner(
        db, SystemClock(), _actor(), settings.job_lease_seconds, max_attempts=settings.job_max_attempts, retry_delay=settings.retry_delay
    )

    def work(claimed_job_id: int) -> str:
        options = DraftOptions(
            generation_preset=settings.generation_preset,
            key_slices=KeySliceSpec(strategy=settings.key_slice_strategy, n=settings.key_slices),  # type: ignore[arg-type]
            batch_size=settings.caption_batch_size,
            destinations=settings.dispatch_destinations,
            storage=settings.storage,
            outputs=outputs.configured(settings),
            routing=routing_rules(settings),
        )
        drafter = Drafter(
            db,
            SystemClock(),
            caption_model(settings),
            options,
            _actor(),
            owner=runner.owner,
            models=lambda name: named_model(settings, name),
        )
        return drafter.draft(claimed_job_id)

    outcome = runner.run(job_id, work)
    LOG.info("job %d: %s", job_id, outcome)
    if outcome == "succeeded":
        try:
            _send_now(settings, db, job_id)
        except Exception:  # the assembler publishes it on its next pass anyway
            LOG.exception("job %d: could not hand the SR to the dispatch queue now", job_id)
    return outcome


def _send_now(settings: Settings, db: Database, job_id: int) -> None:
    """Hand the new SR to the dispatch queue at once (the assembler would, on its next pass)."""
    from sqlalchemy import select

    from service.dispatch_lifecycle import publish_due
    from service.schema import SRDocument
    from workers.celery_app import CeleryPublisher

    with db.session() as s:
        doc_ids = list(s.scalars(select(SRDocument.id).where(SRDocument.job_id == job_id)))  # one per model the rules chose
    for doc_id in doc_ids:
        publish_due(
            db,
            SystemClock(),
            CeleryPublisher(app),
            timedelta(seconds=settings.dispatch_stale_seconds),
            report_id=doc_id,
            actor=_actor(),
        )


# The task keeps its first name ("medcap.send_report"): messages already queued by an older
# version are still consumed after an upgrade.
@app.task(name=DISPATCH_TASK, acks_late=True, reject_on_worker_lost=True)
@prometheus.timed_task(DISPATCH_TASK)
def deliver_output(dispatch_id: int) -> str:
    """Send one dispatch's output to its destination (one attempt)."""
    settings = _settings()
    runner = DispatchRunner(
        _database(settings),
        SystemClock(),
        _actor(),
        kinds=outputs.configured(settings),
        max_attempts=settings.dispatch_max_attempts,
        retry_delay=settings.retry_delay,
        stale_seconds=settings.dispatch_stale_seconds,
    )
    outcome = runner.run(dispatch_id)
    LOG.info("dispatch %d: %s", dispatch_id, outcome)
    return outcome
