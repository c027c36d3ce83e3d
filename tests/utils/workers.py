"""Helpers for worker tests: what a dead worker leaves in the job record."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from service.config import Settings
from service.db import JobRow, session_scope, utcnow


def heartbeat_stops(settings: Settings, job_id: str) -> None:
    """The worker holding the job died (SIGKILL, OOM): its heartbeat is an hour old, long past the cutoff."""
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
