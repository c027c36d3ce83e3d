from __future__ import annotations

from fastapi import APIRouter

from service import auth
from service.api.deps import AdminDep, SessionDep
from service.schemas import KeyCreate, KeyCreated, KeyPublic, KeysPublic

router = APIRouter(prefix="/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, session: SessionDep, _admin: AdminDep) -> KeyCreated:
    """Issue an API key for a tenant (admin only). The key is shown once."""
    row, key = auth.create_key(session, body.tenant, admin=body.admin)
    return KeyCreated(**KeyPublic.model_validate(row).model_dump(), key=key)


@router.get("", response_model=KeysPublic)
def list_keys(session: SessionDep, _admin: AdminDep) -> KeysPublic:
    """All keys, without their secrets (admin only)."""
    rows = auth.list_keys(session)
    return KeysPublic(data=[KeyPublic.model_validate(r) for r in rows], count=len(rows))


@router.delete("/{key_id}", response_model=KeyPublic)
def revoke_key(key_id: str, session: SessionDep, _admin: AdminDep) -> KeyPublic:
    """Revoke a key (admin only); requests with it answer 401 from now on."""
    return KeyPublic.model_validate(auth.revoke_key(session, key_id))
