"""API keys and tenants.

A key is ``zf_<prefix>_<secret>``: 32 random bytes, shown once at creation. Only its SHA-256 is
stored; a fast hash is right here because the key is high-entropy (nothing to brute-force).
Every dataset, job and model belongs to the tenant of the key that created it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import ApiKeyRow, new_id
from service.errors import NotFound, ServiceError

DEFAULT_TENANT = "default"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool
    key_id: str | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str, *, admin: bool = False) -> tuple[ApiKeyRow, str]:
    """Issue a key for ``tenant``. Returns the record and the plaintext key (shown once)."""
    prefix = secrets.token_hex(4)
    key = f"zf_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKeyRow(id=new_id(), tenant=tenant, key_hash=hash_key(key), prefix=prefix, admin=admin)
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, authorization: str | None) -> Principal:
    """Resolve ``Authorization: Bearer <key>`` to a principal, or raise Unauthorized."""
    if not authorization:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("malformed Authorization header; expected 'Bearer <api key>'")
    digest = hash_key(token)
    row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == digest))
    # compare_digest keeps the final comparison constant-time (the lookup is by hash already).
    if row is None or row.revoked or not hmac.compare_digest(row.key_hash, digest):
        raise Unauthorized("invalid or revoked API key")
    return Principal(tenant=row.tenant, admin=row.admin, key_id=row.id)


def list_keys(session: Session) -> list[ApiKeyRow]:
    return list(session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))


def revoke_key(session: Session, key_id: str) -> ApiKeyRow:
    row = session.get(ApiKeyRow, key_id)
    if row is None:
        raise NotFound(f"key {key_id!r} not found")
    row.revoked = True
    session.flush()
    return row
