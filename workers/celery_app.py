"""The worker's entry point: the Celery app ``celery -A workers.celery_app`` uses.

The app itself (queue, task name, configuration) is built in ``service.queue``; this module
adds what only a worker process does: at start-up it removes what its previous run left on disk
(``workers.leftovers``) and begins reconciling lost jobs.
"""

from __future__ import annotations

from celery.signals import worker_ready

from service.config import get_settings
from service.queue import enqueue, get_celery

app = get_celery()


@worker_ready.connect
def _start_reconciler(sender: object = None, **_kwargs: object) -> None:
    from workers.leftovers import sweep_leftovers
    from workers.reconcile import start_reconciler

    # ``sender`` is the worker's consumer; its hostname is the node name tasks see too.
    hostname = getattr(sender, "hostname", None)
    if hostname:
        sweep_leftovers(get_settings(), str(hostname))
    start_reconciler(get_settings(), enqueue)
