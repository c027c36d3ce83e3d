"""The worker's entry point: the Celery app ``celery -A workers.celery_app`` uses.

The app itself (queue, task name, configuration) is built in ``service.queue``; this module
adds what only a worker process does: at start-up it begins reconciling lost jobs.
"""

from __future__ import annotations

from celery.signals import worker_ready

from service.config import get_settings
from service.queue import enqueue, get_celery

app = get_celery()


@worker_ready.connect
def _start_reconciler(**_kwargs: object) -> None:
    from workers.reconcile import start_reconciler

    start_reconciler(get_settings(), enqueue)
