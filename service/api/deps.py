"""Dependencies as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.api.gate import PRINCIPAL_STATE
from service.auth import DEFAULT_TENANT, Forbidden, Principal, authenticate
from service.batching import MicroBatcher
from service.config import Settings, get_settings
from service.db import commit, new_session
from service.event_hub import EventHub
from service.exports import EnqueueExport
from service.jobs import Enqueue
from service.models_store import PredictorCache
from service.queue import enqueue, enqueue_export

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """The request's session: committed when the route returns, before its response is sent.

    ``SessionDep`` declares it with ``scope="function"``, which is what runs the commit before
    the response goes out; with FastAPI's default scope for a ``yield`` dependency ("request")
    the response is sent first, and a commit that then fails follows a 2xx. A failed commit
    answers 503 (:func:`service.db.commit`); an error in the route rolls everything back.
    """
    with new_session(settings) as session:
        yield session
        commit(session)


# Every use must go through this alias: the scope is part of FastAPI's dependency cache key, so a
# plain Depends(get_session) elsewhere would open a second session in the same request.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# Declares the bearer key in the OpenAPI schema (the Authorize button of /docs). It refuses
# nothing by itself: ApiKeyGate has checked the key before the body was read, and
# ``authenticate`` below words the 401 for a missing or malformed header.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    bearerFormat="zf_<prefix>_<secret>",
    description="An API key: `Authorization: Bearer <api key>` (`zoofit keys create` or POST /v1/keys issues one)",
)


def get_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if not settings.auth_enabled:
        return Principal(tenant=DEFAULT_TENANT, admin=True)
    checked = getattr(request.state, PRINCIPAL_STATE, None)
    if isinstance(checked, Principal):
        return checked  # resolved by ApiKeyGate before the body was read: no second lookup
    return authenticate(session, request.headers.get("authorization"))


def get_tenant(principal: Annotated[Principal, Depends(get_principal)]) -> str:
    return principal.tenant


def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.admin:
        raise Forbidden("this route needs an admin API key")
    return principal


def get_predictors(request: Request) -> PredictorCache:
    return request.app.state.predictors  # type: ignore[no-any-return]


def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher  # type: ignore[no-any-return]


def get_event_hub(request: Request) -> EventHub:
    return request.app.state.events  # type: ignore[no-any-return]


def get_enqueue() -> Enqueue:
    return enqueue


def get_enqueue_export() -> EnqueueExport:
    return enqueue_export


PredictorsDep = Annotated[PredictorCache, Depends(get_predictors)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
EventHubDep = Annotated[EventHub, Depends(get_event_hub)]
EnqueueExportDep = Annotated[EnqueueExport, Depends(get_enqueue_export)]
TenantDep = Annotated[str, Depends(get_tenant)]
AdminDep = Annotated[Principal, Depends(get_admin)]
# Bounded: an offset past 2**63 overflowed the database driver into a 500 (found by schemathesis).
OffsetQuery = Annotated[int, Query(ge=0, le=2**31 - 1, description="records to skip")]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="records to return")]
IdempotencyKeyDep = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, pattern=r"^[^\x00]*$", description="retry-safe creation"),
]
