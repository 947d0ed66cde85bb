"""The Celery configuration that the workers' guarantees rest on."""

from __future__ import annotations

from workers.celery_app import CAPTION_QUEUE, CAPTION_TASK, DISPATCH_QUEUE, DISPATCH_TASK, configure


def test_reliability_settings(settings):
    conf = configure(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_routes == {CAPTION_TASK: {"queue": CAPTION_QUEUE}, DISPATCH_TASK: {"queue": DISPATCH_QUEUE}}
    assert conf.task_soft_time_limit == settings.job_time_limit_seconds < conf.task_time_limit < settings.job_redeliver_seconds
    # A replacement pool process loads the model before it reports ready: Celery's 4 s default
    # would kill it again and again, and the GPU worker would never caption another study.
    assert conf.worker_proc_alive_timeout >= 600
