"""``Idempotency-Key`` for resource-creating POSTs: a retried request returns the first result.

A key is remembered for ``Settings.idempotency_ttl_s``; after that the same key is a new request.
Two requests with one key at once both create their resource, but only one commits (the key is
unique per tenant and route): the other rolls back and answers with the first one's resource.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import IdempotencyRow, commit, utcnow
from service.errors import ServiceError, Unavailable


class IdempotencyMismatch(ServiceError):
    status = 422


def lookup(
    session: Session, tenant: str, endpoint: str, key: str | None, fingerprint: str, ttl_s: float
) -> str | None:
    """The resource id an earlier request with this key created within ``ttl_s``, if any."""
    if not key:
        return None
    row = session.scalar(
        select(IdempotencyRow).where(
            IdempotencyRow.tenant == tenant,
            IdempotencyRow.endpoint == endpoint,
            IdempotencyRow.key == key,
            IdempotencyRow.created_at >= utcnow() - timedelta(seconds=ttl_s),
        )
    )
    if row is None:
        return None
    if row.fingerprint != fingerprint:
        raise IdempotencyMismatch(
            f"Idempotency-Key {key!r} was already used with a different request body; use a new key"
        )
    return row.resource_id


def record(
    session: Session, tenant: str, endpoint: str, key: str | None, fingerprint: str, resource_id: str, ttl_s: float
) -> None:
    """Remember ``key`` for ``resource_id`` (committed with the resource); the tenant's expired keys go."""
    if key:
        session.execute(
            delete(IdempotencyRow).where(
                IdempotencyRow.tenant == tenant, IdempotencyRow.created_at < utcnow() - timedelta(seconds=ttl_s)
            )
        )
        session.add(
            IdempotencyRow(tenant=tenant, endpoint=endpoint, key=key, fingerprint=fingerprint, resource_id=resource_id)
        )


def commit_first(
    session: Session, tenant: str, endpoint: str, key: str | None, fingerprint: str, ttl_s: float
) -> str | None:
    """Commit a new resource with its key. None when it is stored; when a request with the same key
    committed first, this one is rolled back and the earlier resource's id is returned.

    Raises:
        Unavailable: the commit failed for another reason (nothing was stored).
    """
    try:
        commit(session)
    except Unavailable as exc:
        if key and isinstance(exc.__cause__, IntegrityError):
            earlier = lookup(session, tenant, endpoint, key, fingerprint, ttl_s)
            if earlier is not None:
                return earlier
        raise
    return None
