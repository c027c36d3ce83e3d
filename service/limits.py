"""Checks made before any parsing: body caps (also for chunked bodies without Content-Length), no NUL in URLs."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import send_problem


class BodySizeLimit:
    """ASGI middleware: refuse a request body larger than ``limit_for(path)`` with 413."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, limit)
            return

        received = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer 413 now; the app sees a disconnected client and stops reading.
                    rejected = True
                    if not started:
                        await _reject(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not rejected:
                raise


class RefuseNulInUrl:
    """ASGI middleware: answer 400 to a URL holding a NUL byte (``%00``) before any route sees it.

    No id, name or filter of this API contains one, and PostgreSQL cannot even compare text with
    it: ``GET /v1/datasets/%00`` was a 500 there (found by fuzzing the PostgreSQL-backed app).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")):
            await send_problem(send, 400, "the URL contains a NUL byte (%00), which no route accepts")
            return
        await self.app(scope, receive, send)


async def _reject(send: Send, limit: int) -> None:
    await send_problem(send, 413, f"request body exceeds the {limit} byte limit for this route", limit=limit)
