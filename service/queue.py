"""The training queue: its name, the task's name, the Celery app and ``enqueue``.

The one owner of how a job id reaches a worker. Training goes to the declared ``train`` queue so
GPU workers can own it. Job state lives in the database, so no result backend is used: the
broker carries job ids only.

The API sends the task by name, so it loads neither torch nor the worker's code; Celery itself
is imported only when the app is first built. The worker's entry point (``workers.celery_app``)
uses the same app, and ``workers.tasks`` registers the task under ``TRAIN_TASK``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from service.config import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

TRAIN_QUEUE = "train"
TRAIN_TASK = "zoofit.train_job"
# Imported by a worker process at start-up (named, not imported: the API never loads them).
WORKER_MODULES = ("workers.tasks",)


def make_celery(settings: Settings) -> Celery:
    from celery import Celery
    from kombu import Queue

    app = Celery("zoofit", broker=settings.resolved_broker_url, include=list(WORKER_MODULES))
    app.conf.update(
        task_queues=(Queue(TRAIN_QUEUE),),
        task_default_queue=TRAIN_QUEUE,
        task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}},
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        # A long training run must not be redelivered to a second worker while the first
        # still holds it (Redis visibility timeout defaults to 1 h).
        broker_transport_options={"visibility_timeout": 12 * 3600},
    )
    if settings.embedded_broker:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # kombu's SQLAlchemy transport hands its options to create_engine: give it none.
        app.conf.broker_transport_options = {}
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue(job_id: str) -> None:
    """Send the job id to the ``train`` queue."""
    get_celery().send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)
