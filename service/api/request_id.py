"""``X-Request-ID``: every request gets an id, in its log lines and echoed in its response.

A sane incoming id (a proxy's or the client's: up to 128 letters, digits and ``._:-``) is kept, so
one id follows a request through the proxy, the API and the client's own logs; anything else is
replaced by a fresh one. A pure ASGI middleware, outermost: it also writes one access line per
request (method, path, status, milliseconds), which replaces uvicorn's; probes and scrapes
(``/healthz``, ``/readyz``, ``/metrics``) are logged at DEBUG only.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_id_var, tenant_var

HEADER = "X-Request-ID"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("zoofit.access")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def request_id_for(incoming: str | None) -> str:
    """The incoming id if it is sane, else a new one."""
    if incoming is not None and _SANE.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestId:
    """ASGI middleware: sets the request id (and clears the tenant) for the request, echoes the id, logs the access."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(Headers(scope=scope).get(HEADER.lower()))
        rid_token = request_id_var.set(request_id)
        tenant_token = tenant_var.set(None)  # set by the API key gate once it knows the caller
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.log(
                logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO,
                "%s %s %d %.1f ms", scope["method"], scope["path"], status, (time.perf_counter() - started) * 1000,
                extra={"method": scope["method"], "path": scope["path"], "status": status,
                       "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
            )
            tenant_var.reset(tenant_token)
            request_id_var.reset(rid_token)
