"""The same Idempotency-Key twice at once: one resource, both answers name it; keys expire."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from service import idempotency
from service.db import DatasetRow, IdempotencyRow, JobRow, session_scope, utcnow
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals_zip


def both_look_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first two lookups wait for each other: both requests find no earlier result."""
    barrier = threading.Barrier(2, timeout=20)
    real = idempotency.lookup
    calls = {"n": 0}

    def lookup(*args, **kwargs):
        found = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] <= 2:
            barrier.wait()
        return found

    monkeypatch.setattr(idempotency, "lookup", lookup)


def _twice(fn) -> list:
    out: list = [None, None]

    def run(i: int) -> None:
        out[i] = fn()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_the_same_job_key_twice_at_once_makes_one_job(settings, enqueued, monkeypatch) -> None:
    with api_client(settings, "alice", enqueued.append) as c:
        ds = c.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
        body = {"dataset_id": ds["id"], **TINY_JOB}
        both_look_first(monkeypatch)
        r = _twice(lambda: c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same"}))
    assert [x.status_code for x in r] == [202, 202], [x.text for x in r]
    assert r[0].json()["id"] == r[1].json()["id"]
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(JobRow)) == 1
    assert enqueued == [r[0].json()["id"]]


def test_the_same_upload_key_twice_at_once_makes_one_dataset(settings, monkeypatch) -> None:
    archive = animals_zip(3, 2)
    with api_client(settings, "alice") as c:
        both_look_first(monkeypatch)
        r = _twice(lambda: c.post("/v1/datasets", files={"file": ("a.zip", archive, "application/zip")},
                                  headers={"Idempotency-Key": "up"}))
    assert [x.status_code for x in r] == [201, 201], [x.text for x in r]
    assert r[0].json()["id"] == r[1].json()["id"]
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(DatasetRow)) == 1
    assert [p.name for p in settings.datasets_dir.iterdir()] == [r[0].json()["id"]]  # the loser's files went


def test_idempotency_keys_expire(client, settings) -> None:
    archive = animals_zip(3, 2)
    first = client.post("/v1/datasets", files={"file": ("a.zip", archive, "application/zip")},
                        headers={"Idempotency-Key": "k"}).json()
    with session_scope(settings) as s:
        expired = utcnow() - timedelta(seconds=settings.idempotency_ttl_s + 1)
        s.execute(update(IdempotencyRow).values(created_at=expired))
    again = client.post("/v1/datasets", files={"file": ("a.zip", archive, "application/zip")},
                        headers={"Idempotency-Key": "k"}).json()
    assert again["id"] != first["id"]  # an expired key is a new request
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(IdempotencyRow)) == 1  # the expired row is gone
