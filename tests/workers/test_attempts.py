"""A job's attempts and time are bounded, and a failed job says what went wrong in one line."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy import update

import models.training
from models.checkpoint import STATE_FILE
from service.db import JobRow, JobStatus, session_scope, utcnow
from tests.utils.data import TINY_JOB
from tests.utils.workers import heartbeat_stops, submit
from workers.jobs import checkpoint_dir, claim_job, run_job
from workers.reconcile import reconcile


def test_a_job_whose_worker_keeps_dying_gives_up(client, settings) -> None:
    job_id = submit(client)
    directory = checkpoint_dir(settings, job_id)
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_bytes(b"what the last worker left")
    sent: list[str] = []
    for attempt in range(1, settings.job_max_attempts + 1):
        assert claim_job(job_id, f"w{attempt}", redelivered=True, settings=settings) == attempt
        heartbeat_stops(settings, job_id)  # killed (OOM)
        assert reconcile(settings, sent.append) == [job_id]  # re-queued: the worker stopped
    assert settings.job_max_attempts == 3  # ZOOFIT_JOB_MAX_ATTEMPTS' default

    # The next delivery does not start a fourth attempt: the job fails, saying why.
    assert claim_job(job_id, "w4", redelivered=True, settings=settings) is None
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["status"] == "failed" and j["attempts"] == 3 and j["finished_at"] is not None
    assert j["error"] == "gave up after 3 attempts: its worker stopped (stale heartbeat)"
    assert not directory.exists()
    assert reconcile(settings, sent.append) == []  # failed for good: never sent again
    assert run_job(job_id, worker="w5", redelivered=True, settings=settings) is None


def test_a_stale_job_at_its_last_attempt_fails_when_taken_over(make_settings) -> None:
    """No reconciler in between: the redelivered message itself finds the worker gone."""
    from tests.conftest import api_client

    settings = make_settings(job_max_attempts="1")
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client)
        assert claim_job(job_id, "w1", redelivered=False, settings=settings) == 1
        # Alive: the redelivered copy neither takes the job nor fails it.
        assert claim_job(job_id, "w2", redelivered=True, settings=settings) is None
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        heartbeat_stops(settings, job_id)  # killed (OOM)
        assert claim_job(job_id, "w2", redelivered=True, settings=settings) is None
        j = client.get(f"/v1/jobs/{job_id}").json()
    assert (j["status"], j["error"]) == ("failed", "gave up after 1 attempts: its worker stopped (stale heartbeat)")


def test_the_celery_app_limits_each_job_in_time(make_settings) -> None:
    from service.queue import make_celery

    # Nothing connects here: the broker URL only selects the Redis transport options.
    conf = make_celery(make_settings(job_time_limit_s="120", broker_url="redis://127.0.0.1:6379/11")).conf
    assert conf.task_soft_time_limit == 120
    assert 120 < conf.task_time_limit <= 300  # the hard limit follows soon after the soft one
    # A long job is not redelivered by Redis while it may still run.
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_a_job_over_its_time_limit_fails_cleanly(make_settings, monkeypatch) -> None:
    from tests.conftest import api_client

    settings = make_settings(job_time_limit_s="90")

    def over_time(*_args, **_kwargs):
        raise SoftTimeLimitExceeded()  # what Celery raises in the task when the soft limit passes

    monkeypatch.setattr(models.training, "train", over_time)
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client)
        assert run_job(job_id, settings=settings) == JobStatus.FAILED
        j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["error"] == "exceeded the time limit of 90 s"
    assert j["progress"]["stage"] == "failed" and j["model_id"] is None
    assert not checkpoint_dir(settings, job_id).exists()


def test_a_job_over_its_time_limit_fails_without_celerys_timer(make_settings) -> None:
    """The worker checks the time limit itself, between batches: Celery's soft and hard limits are
    best effort (celery#6873: a timer that never fires) and once let a job run far past both."""
    from tests.conftest import api_client

    settings = make_settings(job_time_limit_s="4")
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client, {**TINY_JOB, "epochs": 1000})  # minutes of epochs

        def cancel_if_still_running() -> None:  # the old code ran all 1000 epochs: end it as cancelled
            with session_scope(settings) as s:
                s.execute(update(JobRow).where(JobRow.id == job_id).values(cancel_requested=True))

        watchdog = threading.Timer(60, cancel_if_still_running)
        watchdog.start()
        started = time.monotonic()
        try:
            status = run_job(job_id, settings=settings)  # in this process: no Celery, no timer
        finally:
            watchdog.cancel()
        elapsed = time.monotonic() - started
        j = client.get(f"/v1/jobs/{job_id}").json()
    assert (status, j["error"]) == (JobStatus.FAILED, "exceeded the time limit of 4 s")
    assert elapsed < 30 and 0 < len(j["history"]) < 1000
    assert j["progress"]["stage"] == "failed" and j["model_id"] is None
    assert not checkpoint_dir(settings, job_id).exists()


def test_the_hard_time_limit_fails_the_job_it_killed(make_settings) -> None:
    """The hard limit kills the process running the job; the worker's main process fails the job."""
    from tests.conftest import api_client
    from workers.tasks import train_job

    settings = make_settings(job_time_limit_s="60")
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        killed, fresh = submit(client), submit(client)
        for job_id in (killed, fresh):
            assert claim_job(job_id, "w1", redelivered=False, settings=settings) == 1
        with session_scope(settings) as s:  # ``killed`` started longer ago than the time limit
            s.execute(update(JobRow).where(JobRow.id == killed).values(started_at=utcnow() - timedelta(seconds=61)))
        for job_id in (killed, fresh):
            train_job.on_failure(TimeLimitExceeded(120), "task-id", (job_id,), {}, None)
        statuses = {j["id"]: (j["status"], j["error"]) for j in client.get("/v1/jobs").json()["data"]}
    assert statuses == {
        killed: ("failed", "exceeded the time limit of 60 s"),
        fresh: ("running", None),  # a later attempt (another worker's) is not the one that ran out of time
    }


def test_an_unexpected_error_is_one_line_for_the_user_and_a_traceback_in_the_log(
    client, settings, monkeypatch, caplog
) -> None:
    secret_path = settings.data_dir.resolve() / "cache" / "features" / "x.npy"

    def crash(*_args, **_kwargs):
        raise RuntimeError(f"could not map {secret_path}\nsecond line of detail")

    monkeypatch.setattr(models.training, "train", crash)
    job_id = submit(client)
    with caplog.at_level(logging.ERROR, logger="zoofit.worker"):
        assert run_job(job_id, settings=settings) == JobStatus.FAILED
    error = client.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error.startswith("internal error: RuntimeError: could not map "), error
    assert "\n" not in error and "Traceback" not in error and "second line" not in error
    assert str(settings.data_dir.resolve()) not in error and ".py" not in error  # no server paths
    logged = [r for r in caplog.records if job_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback, with the job id, is in the log
    assert logged[0].exc_info[0] is RuntimeError
    assert not [t for t in threading.enumerate() if t.name.startswith("zoofit-heartbeat")]  # stopped with the job


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limits_are_validated(make_settings, limit) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_settings(job_max_attempts=limit)
    with pytest.raises(ValidationError):
        make_settings(job_time_limit_s=limit)


def test_an_error_names_no_path_of_a_scratch_dir_apart_from_the_data_dir(make_settings, tmp_path, monkeypatch) -> None:
    from tests.conftest import api_client

    settings = make_settings(scratch_dir=str(tmp_path / "elsewhere" / "scratch"))
    secret_path = settings.cache_dir.resolve() / "features" / "celery_host" / "x.npy"

    def crash(*_args, **_kwargs):
        raise RuntimeError(f"could not map {secret_path}")

    monkeypatch.setattr(models.training, "train", crash)
    with api_client(settings) as client:
        job_id = submit(client)
        assert run_job(job_id, settings=settings) == JobStatus.FAILED
        error = client.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error == "internal error: RuntimeError: could not map features/celery_host/x.npy", error
