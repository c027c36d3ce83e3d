"""The worker's entry point: the Celery app ``celery -A workers.celery_app`` uses.

The app itself (queue, task name, configuration) is built in ``service.queue``; this module
adds what only a worker process does: before the pool starts it checks the database schema
(``service.schema``: it refuses to start on one that is behind) and starts its metrics server
(``workers.metrics``); once ready it removes what its previous run left on disk
(``workers.leftovers``) and begins reconciling lost jobs. A worker started without ``-Q`` consumes
the queues ``service.queue.worker_queues`` names (those ``zoofit worker`` passes).
"""

from __future__ import annotations

from typing import Any

from celery.signals import (
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from service.config import get_settings
from service.queue import enqueue, get_celery, worker_queues

app = get_celery()

_metrics_dir: list[str | None] = [None]


@celeryd_init.connect
def _choose_queues(instance: Any = None, options: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    # Without -Q a Celery worker consumes every declared queue, train-cuda too on a CPU host:
    # `celery -A workers.celery_app worker` gets the queues `zoofit worker` passes (worker_queues).
    if instance is not None and not (options or {}).get("queues"):
        instance.app.amqp.queues.select(worker_queues(get_settings()))


@worker_init.connect
def _before_the_pool_starts(**_kwargs: Any) -> None:
    from service.db import get_engine
    from workers.metrics import serve_worker_metrics

    # Raises SchemaError (naming `zoofit db upgrade`) on a database behind; then hands back its
    # connections, so that the pool's processes fork without any.
    get_engine(get_settings()).dispose()
    _metrics_dir[0] = serve_worker_metrics(get_settings())


@worker_process_init.connect
def _in_a_new_pool_process(**_kwargs: Any) -> None:
    from service.db import get_engine

    # A pool process forked while the main process held database connections (its reconciler's)
    # must never use them: two processes on one PostgreSQL connection interleave their statements
    # ("prepared statement _pg3_0 already exists" killed a resumed job). Drop the inherited pool
    # without closing the parent's sockets; this process opens its own.
    get_engine(get_settings()).dispose(close=False)


@worker_process_shutdown.connect
def _pool_process_exited(pid: int | None = None, **_kwargs: Any) -> None:
    from workers.metrics import pool_process_exited

    if pid is not None:
        pool_process_exited(pid)


@worker_shutdown.connect
def _stopped(**_kwargs: Any) -> None:
    from workers.metrics import stop_worker_metrics

    stop_worker_metrics(_metrics_dir[0])


@worker_ready.connect
def _start_reconciler(sender: object = None, **_kwargs: object) -> None:
    from workers.leftovers import sweep_leftovers
    from workers.reconcile import start_reconciler

    # ``sender`` is the worker's consumer; its hostname is the node name tasks see too.
    hostname = getattr(sender, "hostname", None)
    if hostname:
        sweep_leftovers(get_settings(), str(hostname))
    start_reconciler(get_settings(), enqueue)
