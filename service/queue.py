"""The queues: their names, the task's name, the Celery app, ``enqueue`` and a worker's queues.

The one owner of how a job id reaches a worker. A training job goes to the train queue of the
device it asks for (``TrainSpec.device``): ``train`` (any worker), ``train-cpu`` or ``train-cuda``.
Every worker serves ``train`` and ``export``, and the device queue of its hardware
(``worker_queues``): a CPU-only host never takes a cuda job, and a cuda job waits for a GPU host.
Job state lives in the database, so no result backend is used: the broker carries job ids only.

The API sends the task by name, so it loads neither torch nor the worker's code; Celery itself
is imported only when the app is first built. The worker's entry point (``workers.celery_app``)
uses the same app, and ``workers.tasks`` registers the task under ``TRAIN_TASK``.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select

from models import runtime
from models.spec import JOB_DEVICES, check_name
from service.config import Settings, get_settings
from service.db import JobRow, session_scope

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import ColumnElement

log = logging.getLogger("zoofit.queue")

TRAIN_QUEUE = "train"
TRAIN_CPU_QUEUE = "train-cpu"
TRAIN_CUDA_QUEUE = "train-cuda"
# A job's device -> its queue. "any" is served by every worker, the others by the workers of that hardware.
TRAIN_QUEUES: dict[str, str] = {"any": TRAIN_QUEUE, "cpu": TRAIN_CPU_QUEUE, "cuda": TRAIN_CUDA_QUEUE}
TRAIN_TASK = "zoofit.train_job"
# Exports (``service.exports``) have a queue of their own, which the same workers serve: the
# reconciler counts the train queues' messages against queued jobs, and an export message there
# would hide a lost job's.
EXPORT_QUEUE = "export"
EXPORT_TASK = "zoofit.export_model"
# Every queue the app declares; a worker consumes the ones ``worker_queues`` names.
QUEUES = (*TRAIN_QUEUES.values(), EXPORT_QUEUE)
# Imported by a worker process at start-up (named, not imported: the API never loads them).
WORKER_MODULES = ("workers.tasks",)
# The hard time limit kills the process running a job this long after the soft limit, which the
# job should have turned into a clean failure by then.
HARD_TIME_LIMIT_GRACE_S = 60.0


def queue_for(device: str | None) -> str:
    """The train queue of a job asking for ``device`` (None: a job recorded before jobs had one, "any")."""
    return TRAIN_QUEUES[check_name("device", device or "any", JOB_DEVICES)]


def job_device() -> ColumnElement[str | None]:
    """A job's device in SQL: its spec's ``device`` (NULL for a job recorded before jobs had one)."""
    return JobRow.spec["device"].as_string()


def worker_device(settings: Settings) -> Literal["cpu", "cuda"]:
    """The hardware this worker trains on: ``ZOOFIT_DEVICE``, where ``auto`` is cuda on a host with a GPU."""
    if settings.device == "auto":
        return "cuda" if runtime.has_cuda() else "cpu"
    return settings.device


def worker_queues(settings: Settings) -> tuple[str, ...]:
    """The queues a worker consumes: ``ZOOFIT_WORKER_QUEUES`` if set, else ``train``, ``export`` and
    ``train-cuda`` on a GPU worker (``worker_device``) or ``train-cpu`` on any other.

    The one place that decides it: ``zoofit worker`` passes it as ``--queues``, and a worker
    started as ``celery -A workers.celery_app worker`` without ``-Q`` selects it at start-up.
    Raises ``UnknownNameError`` (listing the valid names) for an unknown queue in the setting.
    """
    if settings.worker_queues and settings.worker_queues.strip():
        names = [check_name("queue", q.strip(), QUEUES) for q in settings.worker_queues.split(",") if q.strip()]
        if TRAIN_CUDA_QUEUE in names and worker_device(settings) != "cuda":
            log.warning("ZOOFIT_WORKER_QUEUES names %s on a worker without a GPU: the cuda jobs it takes fail "
                        "(a cuda job never trains on the CPU)", TRAIN_CUDA_QUEUE)
        return tuple(dict.fromkeys(names))
    device_queue = TRAIN_CUDA_QUEUE if worker_device(settings) == "cuda" else TRAIN_CPU_QUEUE
    return (TRAIN_QUEUE, device_queue, EXPORT_QUEUE)


def make_celery(settings: Settings) -> Celery:
    from celery import Celery
    from kombu import Queue

    app = Celery("zoofit", broker=settings.resolved_broker_url, include=list(WORKER_MODULES))
    hard_limit = settings.job_time_limit_s + HARD_TIME_LIMIT_GRACE_S
    app.conf.update(
        task_queues=tuple(Queue(q) for q in QUEUES),
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
    """Send the job id to the train queue of the job's device, read from its record.

    Every caller (the API's submit, admission, the reconciler's re-send) has committed the job
    before it sends it, so the record is there to read; a job that is gone meanwhile goes to
    ``train``, where a worker drops its message.
    """
    with session_scope(get_settings()) as s:
        device = s.scalar(select(job_device()).where(JobRow.id == job_id))
    get_celery().send_task(TRAIN_TASK, args=[job_id], queue=queue_for(device))


def enqueue_export(export_id: str) -> None:
    """Send the export id to the ``export`` queue (a worker builds the bundle)."""
    get_celery().send_task(EXPORT_TASK, args=[export_id], queue=EXPORT_QUEUE)


def broker_backlog(queue: str = TRAIN_QUEUE) -> int | None:
    """Messages waiting in ``queue`` (not those a worker has taken), or None when unknown."""
    from amqp.exceptions import ChannelError

    try:
        with get_celery().connection_for_read() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except ChannelError as exc:
        # 404: never declared, so nothing was ever sent to it (a flushed Redis too).
        return 0 if str(getattr(exc, "reply_code", "")) == "404" else None
    except Exception:  # a transport that cannot say, or a broker that is down: the caller assumes loss
        return None
