"""Celery tasks. Thin: take an id, call the plain functions in ``workers.jobs``."""

from __future__ import annotations

import logging

from celery import Task

from service.admission import admit
from service.config import get_settings
from service.queue import TRAIN_TASK, enqueue
from workers.celery_app import app
from workers.jobs import run_job

log = logging.getLogger("zoofit.worker")


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
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
