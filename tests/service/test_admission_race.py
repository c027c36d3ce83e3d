"""Concurrent submissions and admissions of one tenant never pass its limits (``lock_tenant``)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import update

from service.admission import admit
from service.db import JobRow, JobStatus, session_scope, utcnow
from service.errors import TooManyRequests
from service.jobs import submit_job
from service.schemas import JobCreate
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals_zip

STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
RACERS = 8


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, make_settings):
    url = {"database_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    return make_settings(tenant_max_running_jobs="2", tenant_max_queued_jobs="5", **url)


def _race(fn: Callable[[], None]) -> list[BaseException]:
    start = threading.Barrier(RACERS)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait(timeout=30)
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_racing_submissions_and_admissions_keep_to_the_limits(store) -> None:
    with api_client(store, "alice") as c:
        r = c.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")})
        body = JobCreate.model_validate({"dataset_id": r.json()["id"], **TINY_JOB})
    sent: list[str] = []

    def submit() -> None:
        with session_scope(store) as s:
            submit_job(s, store, "alice", body, sent.append)

    errors = _race(submit)
    assert len(errors) == RACERS - 5 and all(isinstance(e, TooManyRequests) for e in errors), errors
    assert len(sent) == 2, sent
    with session_scope(store) as s:
        assert s.query(JobRow).filter(JobRow.status == JobStatus.QUEUED).count() == 5
        s.execute(update(JobRow).where(JobRow.id.in_(sent)).values(status=JobStatus.SUCCEEDED, finished_at=utcnow()))

    assert _race(lambda: admit(store, sent.append)) == []
    assert len(sent) == 4 and len(set(sent)) == 4, sent  # two slots freed: two more sent, each once
