"""Fair order between tenants: which queued jobs have a message in the broker.

The broker's train queues are first come, first served. So that one tenant's backlog never sits
in front of another tenant's job, a tenant has at most ``tenant_max_running_jobs`` jobs *in
flight*: running, or queued with their message sent (``enqueued_at`` set). Its other queued jobs
wait in the database without a message (``enqueued_at`` NULL, progress stage
``WAITING_STAGE``). Another tenant's new job is therefore behind at most that many jobs of each
other tenant, however many they submitted.

``admit`` sends the oldest waiting jobs of each tenant that has free slots. It runs when a job
of the tenant ends (the worker's task after ``run_job``; a cancel through the API) and on every
reconciler pass, which also catches an end nobody followed up (a worker killed after its last
write). ``submit_job`` makes the same decision for a new job inside its own transaction.

Each decision is taken under a per-tenant lock (``lock_tenant``), so two API processes or workers
deciding at once never put more than the limit in flight.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, false, func, or_, select, text, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import JobRow, JobStatus, rowcount, session_scope, utcnow
from service.events import STAGE, append_event

log = logging.getLogger("zoofit.admission")

# How a job id is sent to the workers: ``service.queue.enqueue``, or a stand-in in tests.
Enqueue = Callable[[str], None]

QUEUED_STAGE = "queued"
WAITING_STAGE = "waiting for a free slot"


def waiting_progress(settings: Settings) -> dict[str, Any]:
    """The progress of a queued job that waits for one of its tenant's slots."""
    k = settings.tenant_max_running_jobs
    return {
        "stage": WAITING_STAGE,
        "detail": f"its tenant already has as many jobs sent to the workers or running as it may "
        f"(ZOOFIT_TENANT_MAX_RUNNING_JOBS={k}); it is sent when one of them ends",
    }


def is_waiting() -> ColumnElement[bool]:
    """Queued, not cancelled, and not yet sent to the broker."""
    return (
        (JobRow.status == JobStatus.QUEUED) & JobRow.enqueued_at.is_(None) & JobRow.cancel_requested.is_(False)
    )


def lock_tenant(session: Session, tenant: str) -> None:
    """Serialize admission decisions for ``tenant`` until the transaction ends.

    PostgreSQL: a transaction-scoped advisory lock on a hash of the tenant. SQLite: an empty
    UPDATE, which takes the database's write lock (SQLite has one writer at a time anyway).
    """
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"zoofit-tenant:{tenant}".encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    else:
        session.execute(
            update(JobRow).where(JobRow.tenant == tenant, false()).values(tenant=tenant)
            .execution_options(synchronize_session=False)
        )


def in_flight(session: Session, tenant: str) -> int:
    """The tenant's jobs that hold a slot: running, or queued with their message sent."""
    return session.scalar(
        select(func.count()).select_from(JobRow).where(
            JobRow.tenant == tenant,
            or_(
                JobRow.status == JobStatus.RUNNING,
                (JobRow.status == JobStatus.QUEUED) & JobRow.enqueued_at.is_not(None),
            ),
        )
    ) or 0


def admit(settings: Settings, enqueue: Enqueue, tenant: str | None = None) -> list[str]:
    """Send the oldest waiting jobs of each tenant (or only ``tenant``) that has free slots.

    Returns the ids sent. A job whose message cannot be sent (broker down) goes back to
    waiting, and a later call sends it.
    """
    with session_scope(settings) as s:
        query = select(JobRow.tenant).where(is_waiting()).distinct()
        if tenant is not None:
            query = query.where(JobRow.tenant == tenant)
        tenants = sorted(s.scalars(query))
    sent: list[str] = []
    for t in tenants:
        with session_scope(settings) as s:
            lock_tenant(s, t)
            free = settings.tenant_max_running_jobs - in_flight(s, t)
            ids = [] if free <= 0 else list(s.scalars(
                select(JobRow.id).where(is_waiting(), JobRow.tenant == t)
                .order_by(JobRow.created_at, JobRow.id).limit(free)
            ))
            if ids:
                # RETURNING comes in no promised order (neither PostgreSQL's nor SQLite's): keep
                # the SELECT's oldest-first order, less the jobs that stopped waiting meanwhile.
                marked = set(s.scalars(
                    update(JobRow).where(JobRow.id.in_(ids), is_waiting())
                    .values(enqueued_at=utcnow(), progress={"stage": QUEUED_STAGE})
                    .returning(JobRow.id)
                    .execution_options(synchronize_session=False)
                ))
                ids = [job_id for job_id in ids if job_id in marked]
                for job_id in ids:
                    append_event(s, job_id, STAGE, {"stage": QUEUED_STAGE})
        for job_id in ids:
            try:
                enqueue(job_id)
            except Exception as exc:
                log.warning("job %s: the broker is unreachable (%s); it waits for the next admission", job_id, exc)
                _back_to_waiting(settings, job_id)
                continue
            log.info("job %s of tenant %s: a slot is free; sent to the queue", job_id, t)
            sent.append(job_id)
    return sent


def _back_to_waiting(settings: Settings, job_id: str) -> None:
    with session_scope(settings) as s:
        res = s.execute(
            update(JobRow).where(JobRow.id == job_id, JobRow.status == JobStatus.QUEUED)
            .values(enqueued_at=None, progress=waiting_progress(settings))
            .execution_options(synchronize_session=False)
        )
        if rowcount(res):
            append_event(s, job_id, STAGE, waiting_progress(settings))
