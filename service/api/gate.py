"""The API key is checked before the request body is read: :class:`ApiKeyGate`, a pure ASGI middleware.

FastAPI parses a multipart body (spooling it to a temporary file) before it resolves any
dependency, so a key check done only by a route dependency lets an anonymous client make the
server take in one upload-sized body per request. The gate answers 401 without ever calling
``receive``; the principal it resolved rides in the request state, where ``get_principal``
picks it up instead of looking the key up a second time.
"""

from __future__ import annotations

import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import Principal, authenticate
from service.config import Settings
from service.db import new_session
from service.errors import ServiceError, Unavailable
from service.logs import tenant_var
from service.problems import send_problem

# request.state attribute holding the gate's Principal
PRINCIPAL_STATE = "principal"


class ApiKeyGate:
    """ASGI middleware: every request under ``prefix`` needs a valid API key before its body is read.

    With ``settings.auth_enabled`` off it passes everything through. The per-route dependency
    stays as a second line of defence (and serves apps built without this middleware).
    """

    def __init__(self, app: ASGIApp, settings: Settings, prefix: str = "/v1") -> None:
        self.app = app
        self.settings = settings
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (self.settings.auth_enabled and (path == self.prefix or path.startswith(self.prefix + "/"))):
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization")
        try:
            principal = await anyio.to_thread.run_sync(self._authenticate, authorization)
        except ServiceError as exc:
            await send_problem(send, exc.status, exc.message, headers=exc.headers(), **exc.details)
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
        tenant_var.set(principal.tenant)  # for the log lines of the rest of the request
        await self.app(scope, receive, send)

    def _authenticate(self, authorization: str | None) -> Principal:
        try:
            # A read only: closing the session rolls its transaction back, nothing to commit.
            with new_session(self.settings) as session:
                return authenticate(session, authorization)
        except SQLAlchemyError as exc:
            raise Unavailable("cannot check the API key: the database is unavailable; retry the request") from exc

