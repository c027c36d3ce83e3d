"""Celery tasks. Thin: take an id, call the plain functions in ``workers.jobs``."""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import TimeLimitExceeded

from service.admission import admit
from service.config import get_settings
from service.queue import EXPORT_TASK, TRAIN_TASK, enqueue
from workers.celery_app import app
from workers.exports import run_export
from workers.jobs import fail_timed_out, run_job

log = logging.getLogger("zoofit.worker")


class TrainTask(Task):
    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo | None
    ) -> None:
        # The hard time limit killed the process running the job (the soft limit did not stop
        # it). Runs in the worker's main process: fail the job here, or it would only look like
        # a dead worker's and be re-queued.
        if isinstance(exc, TimeLimitExceeded) and args:
            fail_timed_out(str(args[0]), get_settings())


@app.task(name=TRAIN_TASK, base=TrainTask, bind=True, acks_late=True, reject_on_worker_lost=True,
          ignore_result=True)
def train_job(self: Task, job_id: str) -> str | None:
    """Train the job with this id (safe to run twice: a finished or held job is skipped)."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    try:
        return run_job(job_id, worker=self.request.hostname or "worker", redelivered=redelivered)
    finally:
        # The job's slot may be free now: send its tenant's next waiting job (``service.admission``).
        # The reconciler does the same on every pass, should this fail.
        try:
            admit(get_settings(), enqueue)
        except Exception:
            log.exception("admitting waiting jobs after job %s failed; the reconciler will", job_id)


@app.task(name=EXPORT_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def export_model(export_id: str) -> str | None:
    """Build the export with this id (safe to run twice: only a queued export is built)."""
    return run_export(export_id)
