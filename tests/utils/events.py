"""Reading a job's event stream in tests."""

from __future__ import annotations

import json
from typing import Any

from httpx_sse import connect_sse


def stream_events(client, job_id: str, last_event_id: int | None = None) -> list[tuple[int | None, str, Any]]:
    """Every event of a job's stream until the server closes it: (id, type, data)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(int(e.id) if e.id else None, e.event, json.loads(e.data)) for e in source.iter_sse()]
