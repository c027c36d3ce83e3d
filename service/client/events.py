"""A job's event stream (``GET /v1/jobs/{id}/events``, server-sent events), reconnecting as browsers do.

When the connection drops or the stream ends before its ``done`` event, the stream is opened
again with ``Last-Event-ID`` set to the last id received, so the server sends only what came
after: no event is lost or seen twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from service.client.errors import ApiError, error_message, raise_for_error, retry_after

# The server sends ``: ping`` every 15 s; no byte for this long means the connection is dead.
READ_TIMEOUT_S = 45.0
# Answers worth opening the stream again for: too many streams open (429: one may close) and a
# gateway or server away for a moment. Their Retry-After, when longer, replaces the backoff.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 10.0
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer is taken at this word


class StreamLost(Exception):
    """The stream could not be opened again after ``retries`` tries in a row."""


@dataclass(frozen=True)
class Event:
    """One event of a job: ``type`` is status, stage, epoch, trial, restart or done; ``data`` its JSON."""

    id: str | None
    type: str
    data: dict[str, Any]


def iter_events(
    http: httpx.Client,
    url: str,
    headers: Mapping[str, str],
    *,
    last_event_id: str | None = None,
    retries: int = 8,
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Event]:
    """Events from ``url`` up to and including ``done``, reconnecting with ``Last-Event-ID``.

    Args:
        http: the client to open the stream with (its base URL applies to ``url``).
        url: the stream's route, e.g. ``/v1/jobs/<id>/events``.
        headers: sent on every connection (authorization).
        last_event_id: resume after this event instead of replaying the job from its first.
        retries: failed reconnections in a row before :class:`StreamLost`.
        backoff_s: the first wait before reconnecting; it doubles up to 10 s, or follows the server's
            ``retry:``; a 429's or 503's ``Retry-After``, when longer, is waited instead.
        sleep: how to wait (tests pass a no-op).

    Raises:
        ApiError: the API refused the stream (401, 404, ...): retrying cannot help.
        StreamLost: the connection kept failing.
    """
    failures = 0
    wait = backoff_s
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_S)
    while True:
        h = dict(headers)
        if last_event_id is not None:
            h["Last-Event-ID"] = last_event_id
        asked: float | None = None  # the server's Retry-After on a refusal worth retrying
        why = "dropped"
        try:
            with connect_sse(http, "GET", url, headers=h, timeout=timeout) as source:
                status = source.response.status_code
                if status in RETRY_STATUSES:
                    source.response.read()
                    asked = retry_after(source.response)
                    why = f"answered {status} ({error_message(source.response)})"
                else:
                    raise_for_error(source.response)
                    for sse in source.iter_sse():
                        if sse.retry is not None:
                            wait = sse.retry / 1000
                        if sse.id:
                            last_event_id = sse.id
                        failures = 0
                        event = Event(sse.id or None, sse.event, json.loads(sse.data) if sse.data else {})
                        yield event
                        if event.type == "done":
                            return
        except ApiError:
            raise
        except (httpx.TransportError, SSEError):
            pass  # dropped, timed out, or not a stream (a proxy's error page): open it again
        failures += 1
        if failures > retries:
            raise StreamLost(f"the event stream at {url} {why} {failures} times in a row")
        delay = min(wait * 2 ** (failures - 1), MAX_BACKOFF_S)
        sleep(max(delay, min(asked or 0.0, MAX_RETRY_AFTER_S)))
