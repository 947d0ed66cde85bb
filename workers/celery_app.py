"""The Celery application: queues, reliability settings, and how producers publish to it."""

from __future__ import annotations

from celery import Celery

from service.settings import Settings
from workers.embedded_broker import kombu_url

CAPTION_QUEUE = "caption"  # GPU work: one model per worker process
CAPTION_TASK = "medcap.caption_study"
DISPATCH_QUEUE = "dispatch"  # network work: never waits behind a model
DISPATCH_TASK = "medcap.send_report"
QUEUES = (CAPTION_QUEUE, DISPATCH_QUEUE)
MODEL_LOAD_SECONDS = 900.0  # the longest a pool process may take to load its model (multi-GB checkpoints from network storage)

app = Celery("medcap", include=["workers.tasks"])


def configure(settings: Settings, celery: Celery = app) -> Celery:
    """Point the app (``celery``: the workers' one) at the configured broker. Call once per process before use."""
    celery.conf.update(
        broker_url=kombu_url(settings.effective_broker_url),
        broker_connection_retry_on_startup=True,
        # JSON only, both ways: a pickled message would run code of the sender's choosing in the
        # worker (anyone who can write to the broker). Refused messages are logged and dropped.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=CAPTION_QUEUE,
        task_routes={CAPTION_TASK: {"queue": CAPTION_QUEUE}, DISPATCH_TASK: {"queue": DISPATCH_QUEUE}},
        # Acknowledge after the task ran, and hand it back if the worker process dies,
        # one task at a time per process: a crash never swallows a queued study.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # The soft limit raises inside the task (the job is retried with backoff); the hard
        # limit kills a process stuck in native code, and the job is taken over once stale.
        task_soft_time_limit=settings.job_time_limit_seconds,
        # A pool process loads and warms the model before it reports ready; Celery's 4 s default
        # would kill every replacement process of a GPU worker, which then never captions again.
        worker_proc_alive_timeout=MODEL_LOAD_SECONDS,
        task_time_limit=settings.job_time_limit_seconds + 30,
        broker_transport_options={"visibility_timeout": int(settings.job_redeliver_seconds)}
        if settings.effective_broker_url.startswith("redis")
        else {},
    )
    celery.medcap_settings = settings
    return celery


class CeleryPublisher:
    """Publishes caption jobs and dispatches by task name (the producer does not import the task code)."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def publish(self, job_id: int) -> None:
        self._send(CAPTION_TASK, CAPTION_QUEUE, job_id)

    def publish_dispatch(self, dispatch_id: int) -> None:
        self._send(DISPATCH_TASK, DISPATCH_QUEUE, dispatch_id)

    def _send(self, task: str, queue: str, object_id: int) -> None:
        self.celery.send_task(
            task, args=[object_id], queue=queue, retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}
        )
