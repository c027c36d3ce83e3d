from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service import auth, jobs
from service.api.deps import AdminDep, SessionDep
from service.problems import problem_responses
from service.schemas import KeyCreate, KeyCreated, KeyPublic, KeyRevoked, KeysPublic

router = APIRouter(prefix="/keys", tags=["keys"], responses=problem_responses(403))


@router.post("", status_code=201, response_model=KeyCreated, operation_id="keys-create")
def create_key(body: KeyCreate, session: SessionDep, _admin: AdminDep) -> KeyCreated:
    """Issue an API key for a tenant (admin only). The key is shown once."""
    row, key = auth.create_key(session, body.tenant, admin=body.admin)
    return KeyCreated(**KeyPublic.model_validate(row).model_dump(), key=key)


@router.get("", response_model=KeysPublic, operation_id="keys-list")
def list_keys(session: SessionDep, _admin: AdminDep) -> KeysPublic:
    """All keys, without their secrets (admin only)."""
    rows = auth.list_keys(session)
    return KeysPublic(data=[KeyPublic.model_validate(r) for r in rows], count=len(rows))


@router.delete("/{key_id}", response_model=KeyRevoked, operation_id="keys-revoke",
               responses=problem_responses(404, 409))
def revoke_key(
    key_id: str,
    session: SessionDep,
    _admin: AdminDep,
    cancel_jobs: Annotated[
        bool, Query(description="also cancel the tenant's queued and running jobs (its last live key only, else 409)")
    ] = False,
) -> KeyRevoked:
    """Revoke a key (admin only); requests with it answer 401 from now on."""
    row, cancelled = jobs.revoke_key_and_jobs(session, key_id, cancel_jobs)
    return KeyRevoked(**KeyPublic.model_validate(row).model_dump(), cancelled_jobs=cancelled)
