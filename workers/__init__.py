"""Celery app and tasks: the queue between study assembly and the GPU workers."""
