"""Job records: submit (check its limits, record, then enqueue or leave it waiting), list, read, cancel.

Limits are checked in ``service.quotas``; whether a new job is sent to the broker now or waits for
one of its tenant's slots is ``service.admission``'s rule.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from models.budget import explicit_fields
from service import auth, events, idempotency, models_store
from service.admission import QUEUED_STAGE, Enqueue, admit, in_flight, lock_tenant, waiting_progress
from service.auth import Principal
from service.config import Settings
from service.datasets import get_dataset
from service.db import (
    ApiKeyRow,
    DatasetRow,
    IdempotencyRow,
    JobEventRow,
    JobRow,
    JobStatus,
    ModelRow,
    commit,
    new_id,
    new_session,
    page,
    utcnow,
)
from service.errors import Conflict, NotFound, Unavailable
from service.quotas import check_job_fits, check_queue_room
from service.schemas import JobCreate

__all__ = [
    "Enqueue", "cancel_job", "cancel_tenant_jobs", "get_job", "job_public", "list_jobs", "read_job",
    "revoke_key_and_jobs", "submit_job",
]


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
    # What the request set is kept by the time-budget planner; none set (and no budget_s): the
    # device's default budget (models.planner.default_budget_applies).
    spec["keep"] = sorted(set(body.keep or []) | set(explicit_fields(body.model_copy(update={"keep": None}))))
    fingerprint = hashlib.sha256(json.dumps([dataset.id, spec], sort_keys=True).encode()).hexdigest()
    ttl = settings.idempotency_ttl_s
    earlier = idempotency.lookup(session, tenant, "jobs", idempotency_key, fingerprint, ttl)
    if earlier is not None:
        return get_job(session, earlier, tenant)
    check_job_fits(settings, dataset, body)
    # Held until the commit: concurrent submissions of one tenant count each other, and a delete
    # of the dataset (which takes the same lock) either went before (then it is gone) or waits.
    lock_tenant(session, tenant)
    if session.scalar(select(DatasetRow.id).where(DatasetRow.id == dataset.id)) is None:
        raise NotFound(f"dataset {dataset.id!r} not found (it was deleted)")
    check_queue_room(session, settings, tenant)
    # Sent now if the tenant has a free slot; otherwise it waits (``service.admission``).
    send = in_flight(session, tenant) < settings.tenant_max_running_jobs
    job = JobRow(
        id=new_id(),
        tenant=tenant,
        dataset_id=dataset.id,
        spec=spec,
        status=JobStatus.QUEUED,
        progress={"stage": QUEUED_STAGE} if send else waiting_progress(settings),
        enqueued_at=utcnow() if send else None,
        history=[],
    )
    session.add(job)
    events.append_status(session, job.id, JobStatus.QUEUED, 0)
    events.append_event(session, job.id, events.STAGE, events.stage_data(job.progress))
    idempotency.record(session, tenant, "jobs", idempotency_key, fingerprint, job.id, ttl)
    # Commit before enqueueing so a fast worker always finds the record.
    earlier = idempotency.commit_first(session, tenant, "jobs", idempotency_key, fingerprint, ttl)
    if earlier is not None:  # the same key, at the same moment: that request's job is the answer
        return get_job(session, earlier, tenant)
    if not send:
        return job
    try:
        enqueue(job.id)
    except Exception as exc:
        session.delete(job)
        session.execute(delete(IdempotencyRow).where(IdempotencyRow.resource_id == job.id))
        session.execute(delete(JobEventRow).where(JobEventRow.job_id == job.id))
        commit(session)
        raise Unavailable(f"the job queue (broker) is unreachable: {exc}") from exc
    return job


def get_job(session: Session, job_id: str, tenant: str) -> JobRow:
    job = session.get(JobRow, job_id)
    if job is None or job.tenant != tenant:
        raise NotFound(f"job {job_id!r} not found")
    return job


def read_job(settings: Settings, job_id: str, tenant: str) -> JobRow:
    """``get_job`` on a short session of its own (the row comes back detached, its columns loaded)."""
    with new_session(settings) as session:
        return get_job(session, job_id, tenant)


def _job_for(session: Session, job_id: str, principal: Principal) -> JobRow:
    """The job, if ``principal`` may act on it: its own tenant's, or any job for an admin."""
    if principal.admin:
        job = session.get(JobRow, job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job
    return get_job(session, job_id, principal.tenant)


def list_jobs(
    session: Session, tenant: str, offset: int, limit: int, status: str | None = None
) -> tuple[list[JobRow], int]:
    query = select(JobRow).where(JobRow.tenant == tenant)
    if status:
        query = query.where(JobRow.status == status)
    return page(session, query, offset, limit)


def cancel_job(session: Session, settings: Settings, job_id: str, principal: Principal, enqueue: Enqueue) -> JobRow:
    """Cancel a job of the principal's tenant (an admin: of any tenant); its slot goes to the next one."""
    job = _job_for(session, job_id, principal)
    if job.status in JobStatus.TERMINAL:
        raise Conflict(f"job {job_id!r} is already {job.status}")
    _request_cancel(session, [job_id])
    commit(session)  # answered only once stored: a failed commit is a 503, not a 200
    session.refresh(job)
    if job.status == JobStatus.CANCELLED:
        admit(settings, enqueue, job.tenant)
    return job


def cancel_tenant_jobs(session: Session, tenant: str) -> list[str]:
    """Cancel every unfinished job of ``tenant`` (queued: now; running: between training steps)."""
    ids = list(session.scalars(
        select(JobRow.id).where(JobRow.tenant == tenant, JobRow.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    ))
    _request_cancel(session, ids)
    return ids


def _request_cancel(session: Session, job_ids: list[str]) -> None:
    # Guarded transitions: a worker may claim a job between our read and our write.
    session.execute(
        update(JobRow).where(JobRow.id.in_(job_ids)).values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    cancelled = session.execute(
        update(JobRow)
        .where(JobRow.id.in_(job_ids), JobRow.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow(), progress={"stage": "cancelled"})
        .returning(JobRow.id, JobRow.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    for job_id, attempt in cancelled:
        events.append_event(session, job_id, events.STAGE, {"stage": "cancelled"})
        events.append_status(session, job_id, JobStatus.CANCELLED, attempt)


def revoke_key_and_jobs(session: Session, key_id: str, cancel_jobs: bool = False) -> tuple[ApiKeyRow, list[str]]:
    """Revoke a key; with ``cancel_jobs``, also cancel its tenant's unfinished jobs.

    ``cancel_jobs`` is for a tenant's last live key: while the tenant keeps another live key it is
    refused (409) and nothing changes, so that rotating a key never cancels work. Returns the
    key and the ids of the jobs cancelled.
    """
    row = session.get(ApiKeyRow, key_id)
    if row is None:
        raise NotFound(f"key {key_id!r} not found")
    if cancel_jobs:
        others = list(session.scalars(
            select(ApiKeyRow.id).where(ApiKeyRow.tenant == row.tenant, ApiKeyRow.id != key_id,
                                       ApiKeyRow.revoked.is_(False))
        ))
        if others:
            raise Conflict(
                f"tenant {row.tenant!r} still has {len(others)} other live key{'s' if len(others) > 1 else ''} "
                f"({', '.join(others)}); "
                "cancel_jobs=true is for its last key: revoke the others first, or revoke without cancel_jobs",
                live_keys=others,
            )
    row = auth.revoke_key(session, key_id)
    return row, cancel_tenant_jobs(session, row.tenant) if cancel_jobs else []


def job_public(session: Session, settings: Settings, job: JobRow) -> dict[str, Any]:
    """One job as the API shows it: ``metrics`` is its model's whole report while the model exists."""
    public = {c.key: getattr(job, c.key) for c in JobRow.__table__.columns}
    if job.model_id is not None:
        model = session.get(ModelRow, job.model_id)
        if model is not None and model.tenant == job.tenant:
            public["metrics"] = models_store.full_report(settings, model) or job.metrics
    return public
