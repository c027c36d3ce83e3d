"""A job's events: appended in the transaction of the change they describe, read by id.

``GET /v1/jobs/{id}/events`` streams them (``service.event_hub`` polls, the route sends). Types and
their data (the contract the terminal client and the console read):

- ``status``: ``{"status", "attempt", "error", "model_id"}`` on every status change;
- ``stage``: the job's progress fields (``{"stage": ..., ...}``) without the sticky sweep summary;
- ``epoch``: ``{"member", "members", "epoch", "epochs", "train_loss", "train_acc", "val_loss",
  "val_acc", "lr"}`` (member and epoch 1-based), one per finished training epoch;
- ``trial``: one finished sweep trial (``TrialRecord.to_dict()``);
- ``restart``: ``{"attempt", "resumed_from", "history"}`` when an attempt starts training from the
  start or from a checkpoint (clients reset their curves to ``history``);
- ``done``: ``{"status", "model_id", "error", "metrics"}``, the last event of a finished job.

Every append first locks the job's row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite has one
writer at a time anyway), so of two transactions appending to one job the later one takes its id
only after the earlier one committed: a reader that has seen id ``n`` never finds a smaller id
of the same job committed later. Retention: a job's events live as long as its record (jobs are
never deleted); a job has about ten status and stage events per attempt, one ``epoch`` event per
member and epoch, and one ``stage`` event per sweep trial epoch, all a few hundred bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import JobEventRow, JobRow, JobStatus, new_session

STATUS, STAGE, EPOCH, TRIAL, RESTART, DONE = "status", "stage", "epoch", "trial", "restart", "done"


@dataclass(frozen=True)
class JobEvent:
    id: int
    type: str
    data: dict[str, Any]


def append_event(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> None:
    """Add one event of ``job_id`` to ``session``'s transaction (the caller commits)."""
    session.execute(select(JobRow.id).where(JobRow.id == job_id).with_for_update())
    session.add(JobEventRow(job_id=job_id, type=type_, data=_finite(data)))  # its id is taken under the lock


def append_status(
    session: Session,
    job_id: str,
    status: str,
    attempt: int,
    *,
    error: str | None = None,
    model_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """A ``status`` event, followed by ``done`` when ``status`` is final."""
    append_event(session, job_id, STATUS,
                 {"status": status, "attempt": attempt, "error": error, "model_id": model_id, **extra})
    if status in JobStatus.TERMINAL:
        append_event(session, job_id, DONE, done_data(status, model_id, error, metrics))


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: the stream's data is strict JSON (a diverged loss is null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def done_data(status: str, model_id: str | None, error: str | None, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {"status": status, "model_id": model_id, "error": error, "metrics": metrics}


def stage_data(progress: dict[str, Any]) -> dict[str, Any]:
    """A ``stage`` event's data: the progress without the sweep summary (it has its ``trial`` events)."""
    return {k: v for k, v in progress.items() if k != "sweep"}


def read_events(settings: Settings, job_id: str, after: int, limit: int | None = None) -> list[JobEvent]:
    """The events of ``job_id`` with an id above ``after``, oldest first (one query, short session)."""
    query = select(JobEventRow.id, JobEventRow.type, JobEventRow.data).where(
        JobEventRow.job_id == job_id, JobEventRow.id > after
    ).order_by(JobEventRow.id)
    if limit is not None:
        query = query.limit(limit)
    with new_session(settings) as s:
        return [JobEvent(id=i, type=t, data=d) for i, t, d in s.execute(query)]


def last_event_id(settings: Settings, job_id: str) -> int:
    """The id of the newest event of ``job_id`` (0: none yet)."""
    with new_session(settings) as s:
        return int(s.scalar(select(func.max(JobEventRow.id)).where(JobEventRow.job_id == job_id)) or 0)
