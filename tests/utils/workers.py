"""Helpers for worker tests: what a dead worker leaves in the job record."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from service.config import Settings
from service.db import JobRow, session_scope, utcnow
from tests.utils.data import TINY_JOB, animals_zip


def heartbeat_stops(settings: Settings, job_id: str) -> None:
    """The worker holding the job died (SIGKILL, OOM): its heartbeat is an hour old, long past the cutoff."""
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))


def submit(client, job: dict | None = None) -> str:
    """Upload a small 3-class dataset and submit ``job`` (the tiny recipe by default); the job's id."""
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(6, 3), "application/zip")})
    assert ds.status_code == 201, ds.text
    r = client.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **(job or TINY_JOB)})
    assert r.status_code == 202, r.text
    return r.json()["id"]
