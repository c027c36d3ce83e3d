"""Recorded job event streams in the format of ``GET /v1/jobs/{id}/events``, and a server that replays them.

It serves scripted streams in the route's wire format (``id:``, ``event:``, one line of JSON as
``data:``, ``: ping`` comments) so the watcher's reconnection after a dropped connection is tested
over real HTTP at a chosen point; the real route's stream is tested in tests/service/test_job_events.py.
"""

from __future__ import annotations

import json
from typing import Any

MODEL_ID = "5f0c" * 8


def _epoch(member: int, epoch: int, val_acc: float) -> tuple[str, dict[str, Any]]:
    return "epoch", {"member": member, "members": 2, "epoch": epoch, "epochs": 2, "train_loss": 1.0 / epoch,
                     "train_acc": 0.5 + 0.1 * epoch, "val_loss": 0.5, "val_acc": val_acc, "lr": 0.01}


SUCCEEDED: list[tuple[str, dict[str, Any]]] = [
    ("status", {"status": "queued", "attempt": 0, "error": None, "model_id": None}),
    ("status", {"status": "running", "attempt": 1, "error": None, "model_id": None}),
    ("stage", {"stage": "loading data"}),
    ("stage", {"stage": "training", "member": 1, "members": 2}),
    _epoch(1, 1, 0.625),
    _epoch(1, 2, 0.75),
    _epoch(2, 1, 0.6875),  # the first connection drops after this one
    _epoch(2, 2, 0.8125),
    ("stage", {"stage": "saving model"}),
    ("status", {"status": "succeeded", "attempt": 1, "error": None, "model_id": MODEL_ID}),
    ("done", {"status": "succeeded", "model_id": MODEL_ID, "error": None,
              "metrics": {"val_acc": 0.875, "member_val_acc": [0.75, 0.8125], "val_size": 16, "seconds": 12.5}}),
]
DROP_AFTER = 7

FAILED: list[tuple[str, dict[str, Any]]] = [
    ("status", {"status": "running", "attempt": 1, "error": None, "model_id": None}),
    _epoch(1, 1, 0.5),
    # The worker died; the next attempt resumes from the checkpoint, keeping the first epoch
    # (in the epoch events' shape: 1-based member and epoch).
    ("restart", {"attempt": 2, "resumed_from": {"member": 1, "epoch": 1},
                 "history": [{"member": 1, "members": 2, "epoch": 1, "epochs": 2, "train_loss": 1.0,
                              "train_acc": 0.6, "val_loss": 0.5, "val_acc": 0.5, "lr": 0.01}]}),
    ("status", {"status": "failed", "attempt": 2, "error": "training diverged (loss is NaN)", "model_id": None}),
    ("done", {"status": "failed", "model_id": None, "error": "training diverged (loss is NaN)", "metrics": None}),
]


def frame(event_id: int, kind: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def fake_events_app(streams: dict[str, list[tuple[str, dict[str, Any]]]], key: str, seen: list[dict[str, Any]],
                    drop_after: dict[str, int] | None = None, jobs: dict[str, dict[str, Any]] | None = None,
                    busy: dict[str, tuple[int, str]] | None = None):
    """A Starlette app serving ``streams[job_id]`` at ``/v1/jobs/{job_id}/events``, and ``jobs[job_id]``
    at ``/v1/jobs/{job_id}``.

    ``seen`` records each connection's ``Last-Event-ID``. A job in ``drop_after`` has its first
    connection cut (mid-response, no clean end) after that many events. A job in ``busy`` has its
    first ``n`` connections refused with 429 and ``Retry-After: <its value>``, as the API's limit
    on open streams does (``n`` < 0: every connection).
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def problem(status: int, title: str, detail: str) -> JSONResponse:
        return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail},
                            status_code=status, media_type="application/problem+json")

    async def events(request: Request):
        if request.headers.get("authorization") != f"Bearer {key}":
            return problem(401, "Unauthorized", "missing or invalid API key")
        job_id = request.path_params["job_id"]
        if job_id not in streams:
            return problem(404, "Not Found", f"job {job_id} not found")
        last = request.headers.get("last-event-id")
        seen.append({"job": job_id, "last_event_id": last})
        refusals, wait = (busy or {}).get(job_id, (0, ""))
        if refusals < 0 or len([s for s in seen if s["job"] == job_id]) <= refusals:
            response = problem(429, "Too Many Requests", "tenant 'default' has 2 event streams open already")
            response.headers["Retry-After"] = wait
            return response
        start = int(last) if last else 0
        cut = (drop_after or {}).get(job_id) if len([s for s in seen if s["job"] == job_id]) == 1 else None

        async def body():
            yield b": ping\n\n"
            for i, (kind, data) in enumerate(streams[job_id], start=1):
                if i <= start:
                    continue
                yield frame(i, kind, data)
                if cut is not None and i >= cut:
                    raise ConnectionAbortedError("the test drops the connection")

        return StreamingResponse(body(), media_type="text/event-stream")

    async def job(request: Request):
        if request.headers.get("authorization") != f"Bearer {key}":
            return problem(401, "Unauthorized", "missing or invalid API key")
        job_id = request.path_params["job_id"]
        if job_id not in (jobs or {}):
            return problem(404, "Not Found", f"job {job_id} not found")
        return JSONResponse((jobs or {})[job_id])

    return Starlette(routes=[Route("/v1/jobs/{job_id}/events", events), Route("/v1/jobs/{job_id}", job)])
