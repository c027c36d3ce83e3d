"""A job's event stream as server-sent events (sse-starlette), tied to its ``EventHub`` subscription."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from service.db import JobRow, JobStatus
from service.event_hub import EventHub, Subscription
from service.events import DONE, JobEvent, done_data

# A client that takes longer than this to accept one event (it stopped reading) is disconnected.
SEND_TIMEOUT_S = 30.0

OPENAPI_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events: `id` (increasing), `event` (status, stage, epoch, trial, restart, "
        "done) and one line of JSON `data`; the stream ends after `done`. Send `Last-Event-ID` to resume.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
}


def _sse(event: JobEvent) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(event.data, separators=(",", ":")), event=event.type, id=str(event.id))


async def _events(sub: Subscription, finished: dict[str, Any] | None) -> AsyncIterator[ServerSentEvent]:
    for event in sub.replayed():
        yield _sse(event)
        if event.type == DONE:
            return
    if finished is not None:
        # Finished before the stream opened, and its ``done`` is not after Last-Event-ID (it was
        # seen already, or the job predates events): say how it ended once more, then close.
        yield ServerSentEvent(data=json.dumps(finished, separators=(",", ":")), event=DONE)
        return
    async for event in sub.live():
        yield _sse(event)
        if event.type == DONE:
            return
    # The live feed ended without ``done``: this client fell behind (or the server is stopping);
    # it reconnects with Last-Event-ID and its replay catches up.


async def _nothing() -> AsyncIterator[ServerSentEvent]:
    return
    yield


class JobEventStream(EventSourceResponse):
    """The stream of ``job`` after event ``after``; its ``hub`` subscription lives while the response is sent.

    The subscription is opened when the response starts (``__call__``), not by the endpoint: an
    answer that is never sent (its request failed or went away in between) then holds no stream
    slot and no poller. Its errors (``TooManyRequests``, ``Unavailable``, the database's) come
    before the first byte, so the app's handlers still answer them as problem documents.
    """

    def __init__(self, hub: EventHub, job: JobRow, tenant: str, after: int, ping_s: float) -> None:
        super().__init__(
            _nothing(),
            ping=ping_s,
            ping_message_factory=lambda: ServerSentEvent(comment="ping"),
            send_timeout=SEND_TIMEOUT_S,
        )
        self._hub = hub
        self._job = job
        self._tenant = tenant
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"].upper() == "HEAD":
            await super().__call__(scope, receive, send)  # headers only: nothing to subscribe to
            return
        job = self._job
        finished = None
        if job.status in JobStatus.TERMINAL:
            finished = done_data(job.status, job.model_id, job.error, job.metrics)
        sub = await self._hub.open(job.id, self._tenant, self._after)
        try:
            self.body_iterator = _events(sub, finished)
            await super().__call__(scope, receive, send)
        finally:
            self._hub.close(sub)
