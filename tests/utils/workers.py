"""Helpers for worker tests: what a dead worker leaves in the job record, real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import IO

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


def start_worker(
    name: str, log: IO[bytes] | int = subprocess.DEVNULL, new_session: bool = False,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """A real worker process named ``<name>-<pid>@host``, configured by this process's environment
    with ``env`` on top (a worker of another host: its own data and scratch dirs).

    Its log goes to ``log`` (a file or DEVNULL): a pipe nobody reads fills up (64 KiB) and blocks
    the worker's next log line, which looks exactly like a hung worker.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--hostname", f"{name}-{os.getpid()}@%h"],
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session,
    )


def wait_status(client, job_id: str, statuses: set[str], timeout: float = 180, log: Path | None = None) -> dict:
    """The job once its status is one of ``statuses`` (polled through the API); a timeout's message
    ends with the last lines of the worker's ``log``, where one was kept."""
    deadline = time.monotonic() + timeout
    while True:
        j = client.get(f"/v1/jobs/{job_id}").json()
        if j["status"] in statuses:
            return j
        assert time.monotonic() < deadline, f"job stuck in {j['status']}: {j['progress']}{log_tail(log)}"
        time.sleep(0.25)


def log_tail(log: Path | None, lines: int = 40) -> str:
    """The last ``lines`` of a worker's log, for an assertion's message ('' without one)."""
    if log is None or not log.is_file():
        return ""
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return "\nthe worker's log ends:\n" + "\n".join(tail)
