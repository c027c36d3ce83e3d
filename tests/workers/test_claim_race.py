"""Workers racing for one job on the real PostgreSQL: the guarded claim lets exactly one win."""

from __future__ import annotations

import threading

import pytest

from service.db import JobRow, JobStatus, session_scope
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals_zip
from workers.jobs import claim_job

pytestmark = pytest.mark.integration

RACERS = 8


def test_workers_racing_for_one_job_exactly_one_wins(make_settings, pg_url):
    settings = make_settings(database_url=pg_url)
    with api_client(settings, enqueue=lambda _job_id: None) as c:
        ds = c.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
        job_ids = [c.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()["id"] for _ in range(5)]

    for job_id in job_ids:  # several rounds: one lucky interleaving proves little
        start = threading.Barrier(RACERS)
        won: list[str] = []
        errors: list[BaseException] = []

        def race(worker: str, job_id: str = job_id, start: threading.Barrier = start,
                 won: list[str] = won, errors: list[BaseException] = errors) -> None:
            try:
                start.wait(timeout=30)
                if claim_job(job_id, worker, redelivered=False, settings=settings):
                    won.append(worker)
            except BaseException as exc:  # surfaced below: a racer must not crash either
                errors.append(exc)

        threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(RACERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(won) == 1, f"{job_id}: {won} all claimed it"
        with session_scope(settings) as s:
            row = s.get(JobRow, job_id)
            assert row.status == JobStatus.RUNNING and row.worker == won[0] and row.attempts == 1
