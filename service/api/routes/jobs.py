from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from service import jobs
from service.api.deps import (
    EnqueueDep,
    EventHubDep,
    IdempotencyKeyDep,
    LimitQuery,
    OffsetQuery,
    SessionDep,
    SettingsDep,
    TenantDep,
    get_principal,
)
from service.api.event_stream import OPENAPI_RESPONSE, JobEventStream
from service.auth import Principal
from service.problems import problem_responses
from service.schemas import JobCreate, JobPublic, JobsPublic, JobStatusName, JobSummaryPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobPublic, operation_id="jobs-create",
             responses=problem_responses(404, 409, 429))
def submit_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    enqueue: EnqueueDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JobPublic:
    """Submit a fine-tuning job; it is queued for a training worker (422: too big; 429: too many queued)."""
    return JobPublic.model_validate(jobs.submit_job(session, settings, tenant, body, enqueue, idempotency_key))


@router.get("", response_model=JobsPublic, operation_id="jobs-list")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Annotated[JobStatusName | None, Query(description="only jobs in this state")] = None,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 100,
) -> JobsPublic:
    """List jobs, newest first."""
    rows, count = jobs.list_jobs(session, tenant, offset, limit, status)
    return JobsPublic(data=[JobSummaryPublic.model_validate(r) for r in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic, operation_id="jobs-get", responses=problem_responses(404))
def get_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> JobPublic:
    """Status, progress, per-epoch history, final metrics and error of one job."""
    return JobPublic.model_validate(jobs.job_public(session, settings, jobs.get_job(session, job_id, tenant)))


@router.post("/{job_id}/cancel", response_model=JobPublic, operation_id="jobs-cancel",
             responses=problem_responses(404, 409))
def cancel_job(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    principal: Annotated[Principal, Depends(get_principal)],
    enqueue: EnqueueDep,
) -> JobPublic:
    """Cancel a queued or running job (honoured between training steps); an admin key may cancel any tenant's."""
    return JobPublic.model_validate(jobs.cancel_job(session, settings, job_id, principal, enqueue))


@router.get(
    "/{job_id}/events",
    operation_id="jobs-events",
    response_class=EventSourceResponse,
    responses={**OPENAPI_RESPONSE, **problem_responses(404, 429)},
)
async def job_events(
    job_id: str,
    settings: SettingsDep,
    tenant: TenantDep,
    hub: EventHubDep,
    last_event_id: Annotated[
        int | None, Header(alias="Last-Event-ID", ge=0, le=2**63 - 1, description="resume after this event id")
    ] = None,
) -> JobEventStream:
    """Live events of one job (server-sent events): status, stages, epochs, sweep trials; `done` ends it."""
    # A session of its own, closed before the stream opens: a request session would keep its
    # pooled connection while this request waits for the replay, which needs another one.
    job = await run_in_threadpool(jobs.read_job, settings, job_id, tenant)
    # Subscribes as it is sent (its 429/503 over the stream limits come from there).
    return JobEventStream(hub, job, tenant, last_event_id or 0, settings.events_ping_s)
