"""Celery tasks. Thin: take an id, call the plain functions in ``workers.jobs``."""

from __future__ import annotations

from celery import Task

from service.queue import TRAIN_TASK
from workers.celery_app import app
from workers.jobs import run_job


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train_job(self: Task, job_id: str) -> str | None:
    """Train the job with this id (safe to run twice: a finished or held job is skipped)."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    return run_job(job_id, worker=self.request.hostname or "worker", redelivered=redelivered)
