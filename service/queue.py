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
# Exports (``service.exports``) have a queue of their own, which the same workers serve: the
# reconciler counts the train queue's messages against queued jobs, and an export message there
# would hide a lost job's.
EXPORT_QUEUE = "export"
EXPORT_TASK = "zoofit.export_model"
WORKER_QUEUES = (TRAIN_QUEUE, EXPORT_QUEUE)
# Imported by a worker process at start-up (named, not imported: the API never loads them).
WORKER_MODULES = ("workers.tasks",)
# The hard time limit kills the process running a job this long after the soft limit, which the
# job should have turned into a clean failure by then.
HARD_TIME_LIMIT_GRACE_S = 60.0


def make_celery(settings: Settings) -> Celery:
    from celery import Celery
    from kombu import Queue

    app = Celery("zoofit", broker=settings.resolved_broker_url, include=list(WORKER_MODULES))
    hard_limit = settings.job_time_limit_s + HARD_TIME_LIMIT_GRACE_S
    app.conf.update(
        task_queues=tuple(Queue(q) for q in WORKER_QUEUES),
        task_default_queue=TRAIN_QUEUE,
        task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}, EXPORT_TASK: {"queue": EXPORT_QUEUE}},
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        # A job running past the soft limit fails ("exceeded the time limit"); the hard limit
        # kills the process if it did not stop (prefork pool only).
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=hard_limit,
        # Redis redelivers a message not acked within the visibility timeout (default 1 h). The
        # redelivered copy cannot take a live job (its heartbeat is fresh), but it should not come
        # back while the job may still run at all.
        broker_transport_options={"visibility_timeout": max(12 * 3600, hard_limit + 3600)},
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


def enqueue_export(export_id: str) -> None:
    """Send the export id to the ``export`` queue (a worker builds the bundle)."""
    get_celery().send_task(EXPORT_TASK, args=[export_id], queue=EXPORT_QUEUE)


def broker_backlog() -> int | None:
    """Messages waiting in the ``train`` queue (not those a worker has taken), or None when unknown."""
    from amqp.exceptions import ChannelError

    try:
        with get_celery().connection_for_read() as conn:
            return int(conn.default_channel.queue_declare(queue=TRAIN_QUEUE, passive=True).message_count)
    except ChannelError as exc:
        # 404: never declared, so nothing was ever sent to it (a flushed Redis too).
        return 0 if str(getattr(exc, "reply_code", "")) == "404" else None
    except Exception:  # a transport that cannot say, or a broker that is down: the caller assumes loss
        return None
