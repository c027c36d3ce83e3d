"""Job records: submit (record, then enqueue), list, read, cancel."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service import idempotency, models_store
from service.config import Settings
from service.datasets import get_dataset
from service.db import IdempotencyRow, JobRow, JobStatus, ModelRow, new_id, page, utcnow
from service.errors import Conflict, NotFound, Unavailable
from service.schemas import JobCreate

# How a job id is sent to the workers: ``service.queue.enqueue``, or a stand-in in tests.
Enqueue = Callable[[str], None]


def submit_job(
    session: Session,
    settings: Settings,
    tenant: str,
    body: JobCreate,
    enqueue: Enqueue,
    idempotency_key: str | None = None,
) -> JobRow:
    dataset = get_dataset(session, body.dataset_id, tenant)
    spec = body.model_dump(mode="json", exclude={"dataset_id"})
    fingerprint = hashlib.sha256(json.dumps([dataset.id, spec], sort_keys=True).encode()).hexdigest()
    earlier = idempotency.lookup(session, tenant, "jobs", idempotency_key, fingerprint)
    if earlier is not None:
        return get_job(session, earlier, tenant)
    job = JobRow(
        id=new_id(),
        tenant=tenant,
        dataset_id=dataset.id,
        spec=spec,
        status=JobStatus.QUEUED,
        progress={"stage": "queued"},
        enqueued_at=utcnow(),
        history=[],
    )
    session.add(job)
    idempotency.record(session, tenant, "jobs", idempotency_key, fingerprint, job.id)
    # Commit before enqueueing so a fast worker always finds the record.
    session.commit()
    try:
        enqueue(job.id)
    except Exception as exc:
        session.delete(job)
        session.execute(delete(IdempotencyRow).where(IdempotencyRow.resource_id == job.id))
        session.commit()
        raise Unavailable(f"the job queue (broker) is unreachable: {exc}") from exc
    return job


def get_job(session: Session, job_id: str, tenant: str) -> JobRow:
    job = session.get(JobRow, job_id)
    if job is None or job.tenant != tenant:
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(
    session: Session, tenant: str, offset: int, limit: int, status: str | None = None
) -> tuple[list[JobRow], int]:
    query = select(JobRow).where(JobRow.tenant == tenant)
    if status:
        query = query.where(JobRow.status == status)
    return page(session, query, offset, limit)


def cancel_job(session: Session, job_id: str, tenant: str) -> JobRow:
    job = get_job(session, job_id, tenant)
    if job.status in JobStatus.TERMINAL:
        raise Conflict(f"job {job_id!r} is already {job.status}")
    # Guarded transitions: a worker may claim the job between our read and our write.
    session.execute(
        update(JobRow).where(JobRow.id == job_id).values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow(), progress={"stage": "cancelled"})
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(job)
    return job


def job_public(session: Session, job: JobRow) -> dict[str, Any]:
    """One job as the API shows it: ``metrics`` is its model's whole report while the model exists."""
    public = {c.key: getattr(job, c.key) for c in JobRow.__table__.columns}
    if job.model_id is not None:
        model = session.get(ModelRow, job.model_id)
        if model is not None and model.tenant == job.tenant:
            public["metrics"] = models_store.full_report(model) or job.metrics
    return public
