"""``Idempotency-Key`` for resource-creating POSTs: a retried request returns the first result."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import IdempotencyRow
from service.errors import ServiceError


class IdempotencyMismatch(ServiceError):
    status = 422


def lookup(session: Session, tenant: str, endpoint: str, key: str | None, fingerprint: str) -> str | None:
    """The resource id an earlier request with this key created, if any."""
    if not key:
        return None
    row = session.scalar(
        select(IdempotencyRow).where(
            IdempotencyRow.tenant == tenant, IdempotencyRow.endpoint == endpoint, IdempotencyRow.key == key
        )
    )
    if row is None:
        return None
    if row.fingerprint != fingerprint:
        raise IdempotencyMismatch(
            f"Idempotency-Key {key!r} was already used with a different request body; use a new key"
        )
    return row.resource_id


def record(session: Session, tenant: str, endpoint: str, key: str | None, fingerprint: str, resource_id: str) -> None:
    if key:
        session.add(
            IdempotencyRow(tenant=tenant, endpoint=endpoint, key=key, fingerprint=fingerprint, resource_id=resource_id)
        )
