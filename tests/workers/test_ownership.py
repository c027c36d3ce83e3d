"""One job, one worker: a live worker keeps its job, and a worker that lost its job writes nothing.

The double run these tests reproduce: a worker decoding a large dataset beats no heartbeat, so
the reconciler re-queues its job and a second worker trains it too; a redelivered message (a
brief Redis disconnect, the visibility timeout) takes the job over even though its worker is
alive. Two models, one history written by both, each worker deleting the other's files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

import models.data
from models.checkpoint import has_state
from service.db import JobRow, JobStatus, ModelRow, new_id, session_scope, utcnow
from tests.conftest import api_client
from tests.utils.data import TINY_JOB
from tests.utils.workers import heartbeat_stops, submit
from workers.jobs import checkpoint_dir, run_job
from workers.reconcile import reconcile

HEARTBEAT_S = 0.5  # a running job is stale once its heartbeat is 3 x 0.5 s old
JOB = {**TINY_JOB, "epochs": 3}


class Run(threading.Thread):
    """``run_job`` in a thread of its own, as a second worker process would run it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = "not finished"
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def outcome(self, timeout: float = 120) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the worker thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result




def _slow_first_decode(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The first ``load_folder`` call (the first worker's) blocks until released; later ones do not."""
    real = models.data.load_folder
    decoding, release = threading.Event(), threading.Event()
    calls = []

    def load_folder(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            decoding.set()
            assert release.wait(120), "the test never released the decode"
        return real(*args, **kwargs)

    monkeypatch.setattr(models.data, "load_folder", load_folder)
    return decoding, release


def _row(settings, job_id: str) -> JobRow:
    with session_scope(settings) as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        return row


def _models_of(settings, job_id: str) -> int:
    with session_scope(settings) as s:
        return s.scalar(select(func.count()).select_from(ModelRow).where(ModelRow.job_id == job_id)) or 0


def _heartbeat_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("zoofit-heartbeat")]


def test_a_slow_decode_is_neither_requeued_nor_taken_over(make_settings, monkeypatch) -> None:
    """A decode longer than the stale cutoff: the reconciler leaves the job alone, a second worker too."""
    settings = make_settings(worker_heartbeat_s=str(HEARTBEAT_S))
    sent: list[str] = []
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client, JOB)
    decoding, release = _slow_first_decode(monkeypatch)

    a = Run(lambda: run_job(job_id, worker="wA", settings=settings))
    try:
        assert decoding.wait(60)
        claimed_beat = _row(settings, job_id).heartbeat_at
        time.sleep(5 * HEARTBEAT_S)  # decoding for longer than the stale cutoff (3 heartbeats)
        beat_during_decode = _row(settings, job_id).heartbeat_at
        requeued = reconcile(settings, sent.append)
        # The reconciler's message (had it re-queued the job) reaches a second worker...
        b = run_job(job_id, worker="wB", settings=settings)
        # ...and a redelivered copy of the first message reaches a third.
        c = run_job(job_id, worker="wC", redelivered=True, settings=settings)
    finally:
        release.set()
    a_outcome = a.outcome()

    row = _row(settings, job_id)
    seen = {
        "requeued": requeued,
        "second worker": b,
        "third worker": c,
        "first worker": a_outcome,
        "models of the job": _models_of(settings, job_id),
        "model folders": len(list(settings.models_dir.iterdir())),
        "history epochs": [h["epoch"] for h in row.history],
        "worker": row.worker,
        "attempts": row.attempts,
    }
    assert seen == {
        "requeued": [],
        "second worker": None,
        "third worker": None,
        "first worker": JobStatus.SUCCEEDED,
        "models of the job": 1,
        "model folders": 1,
        "history epochs": [0, 1, 2],
        "worker": "wA",
        "attempts": 1,
    }
    assert beat_during_decode is not None and claimed_beat is not None
    assert beat_during_decode > claimed_beat  # the heartbeat went on while the images decoded
    assert row.model_id is not None and (settings.models_dir / row.model_id).is_dir()
    assert _heartbeat_threads() == []  # stopped with the job


def test_a_redelivered_message_does_not_take_over_a_live_job(client, settings, monkeypatch) -> None:
    """The broker redelivers while the first worker is alive (fresh heartbeat): the copy is refused."""
    job_id = submit(client, JOB)
    decoding, release = _slow_first_decode(monkeypatch)

    a = Run(lambda: run_job(job_id, worker="wA", settings=settings))
    try:
        assert decoding.wait(60)
        second = run_job(job_id, worker="wB", redelivered=True, settings=settings)
        after_second = _row(settings, job_id)
    finally:
        release.set()
    first = a.outcome()

    row = _row(settings, job_id)
    seen = {
        "second worker": second,
        "worker while the first decodes": after_second.worker,
        "first worker": first,
        "models of the job": _models_of(settings, job_id),
        "history epochs": [h["epoch"] for h in row.history],
        "worker": row.worker,
        "attempts": row.attempts,
    }
    assert seen == {
        "second worker": None,
        "worker while the first decodes": "wA",
        "first worker": JobStatus.SUCCEEDED,
        "models of the job": 1,
        "history epochs": [0, 1, 2],
        "worker": "wA",
        "attempts": 1,
    }


STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


def _store_settings(make_settings, request, store: str):
    return make_settings(**({"database_url": request.getfixturevalue("pg_url")} if store == "postgresql" else {}))


@pytest.mark.parametrize("store", STORES)
def test_a_worker_that_lost_its_job_stops_and_writes_nothing(make_settings, request, store) -> None:
    """Another worker took the job over (this one froze past the cutoff): it stops, writes nothing,
    and leaves the checkpoint to the new owner, which finishes the job from it."""
    settings = _store_settings(make_settings, request, store)
    epochs = 8
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client, {**TINY_JOB, "epochs": epochs})
    ckpt = checkpoint_dir(settings, job_id)

    a = Run(lambda: run_job(job_id, worker="wA", settings=settings))
    deadline = time.monotonic() + 120
    while len(_row(settings, job_id).history) < 2 or not has_state(ckpt):
        assert time.monotonic() < deadline and a.is_alive(), "the first worker never trained two epochs"
        time.sleep(0.02)
    # What a claim writes when it takes a stale job over, in one statement: from here on the job
    # is attempt 2's, worker wB's.
    with session_scope(settings) as s:
        s.execute(
            update(JobRow).where(JobRow.id == job_id)
            .values(attempts=JobRow.attempts + 1, worker="wB", heartbeat_at=utcnow())
        )
    taken = _row(settings, job_id)
    first = a.outcome()

    row = _row(settings, job_id)
    seen = {
        "first worker": first,
        "status": row.status,
        "worker": row.worker,
        "history unchanged": row.history == taken.history,
        "progress unchanged": row.progress == taken.progress,
        "models of the job": _models_of(settings, job_id),
        "model folders": len(list(settings.models_dir.iterdir())),
        "checkpoint kept": has_state(ckpt),
    }
    assert seen == {
        "first worker": None,
        "status": JobStatus.RUNNING,
        "worker": "wB",
        "history unchanged": True,
        "progress unchanged": True,
        "models of the job": 0,
        "model folders": 0,
        "checkpoint kept": True,
    }
    assert _heartbeat_threads() == []

    # The new owner goes silent too (say it died); the next worker resumes from the checkpoint
    # the first one left, and the job ends as one run with one model.
    heartbeat_stops(settings, job_id)
    assert run_job(job_id, worker="wC", redelivered=True, settings=settings) == JobStatus.SUCCEEDED
    row = _row(settings, job_id)
    assert [h["epoch"] for h in row.history] == list(range(epochs))
    assert row.progress.get("resumed_from") is not None
    assert _models_of(settings, job_id) == 1 and not ckpt.exists()


@pytest.mark.parametrize("store", STORES)
def test_the_database_holds_one_model_per_job(make_settings, request, store) -> None:
    settings = _store_settings(make_settings, request, store)

    def model(job_id: str) -> ModelRow:
        return ModelRow(id=new_id(), job_id=job_id, dataset_id="d", classes=["a"], manifest={}, metrics={},
                        store_key="models/p")

    with session_scope(settings) as s:
        s.add(model("job-1"))
    with pytest.raises(IntegrityError), session_scope(settings) as s:
        s.add(model("job-1"))
    with session_scope(settings) as s:
        s.add(model("job-2"))
    assert _models_of(settings, "job-1") == 1 and _models_of(settings, "job-2") == 1


def test_a_lost_lease_stops_beating_and_never_refreshes_the_new_owners_heartbeat(make_settings) -> None:
    """The heartbeat of a worker that lost its job must not keep the new owner's record alive."""
    from workers.jobs import claim_job
    from workers.lease import JobLost, Lease

    settings = make_settings(worker_heartbeat_s="0.05")
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client, JOB)
    attempt = claim_job(job_id, "wA", redelivered=False, settings=settings)
    assert attempt == 1
    with Lease(job_id, attempt, settings) as lease:
        time.sleep(0.3)
        assert not lease.lost and _heartbeat_threads() == [f"zoofit-heartbeat-{job_id}"]
        assert _row(settings, job_id).heartbeat_at > _row(settings, job_id).started_at  # it beats
        frozen = utcnow() - timedelta(hours=1)
        with session_scope(settings) as s:  # taken over; the new owner's heartbeat happens to be old
            s.execute(update(JobRow).where(JobRow.id == job_id)
                      .values(attempts=2, worker="wB", heartbeat_at=frozen))
        deadline = time.monotonic() + 10
        while _heartbeat_threads():  # the thread ends by itself at its first unmatched beat
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert lease.lost
        with pytest.raises(JobLost):
            lease.write(progress={"stage": "from the loser"})
    row = _row(settings, job_id)
    assert row.worker == "wB" and row.progress != {"stage": "from the loser"}
    assert row.heartbeat_at.replace(tzinfo=None) == frozen.replace(tzinfo=None)  # untouched by wA
