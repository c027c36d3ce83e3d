"""The Celery application, configured from the service's settings.

Training goes to the declared ``train`` queue so GPU workers can own it. Job state lives in
the database, so no result backend is used: the broker carries job ids only.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from celery.signals import worker_ready
from kombu import Queue

from service.config import TRAIN_QUEUE, Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("zoofit", broker=settings.resolved_broker_url, include=["workers.tasks"])
    app.conf.update(
        task_queues=(Queue(TRAIN_QUEUE),),
        task_default_queue=TRAIN_QUEUE,
        task_routes={"zoofit.train_job": {"queue": TRAIN_QUEUE}},
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


app = get_celery()


@worker_ready.connect
def _start_reconciler(**_kwargs: object) -> None:
    from service.jobs import celery_enqueue
    from workers.reconcile import start_reconciler

    start_reconciler(get_settings(), celery_enqueue)
