"""The database goes away under a training job: the job is neither failed nor lost."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

import workers.jobs
from models.checkpoint import has_state
from service.db import JobRow, JobStatus, session_scope
from tests.utils.data import TINY_JOB, animals_zip
from tests.utils.workers import heartbeat_stops
from workers.jobs import checkpoint_dir, run_job


def test_a_lost_database_connection_leaves_the_job_to_resume_not_failed(client, settings, monkeypatch) -> None:
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    job_id = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 3}).json()["id"]
    real_on_epoch = workers.jobs.JobReporter.on_epoch
    calls = {"n": 0}

    def flaky(self, rec):  # the second epoch's write meets a database that has just gone away
        calls["n"] += 1
        if calls["n"] == 2:
            raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection unexpectedly"))
        return real_on_epoch(self, rec)

    monkeypatch.setattr(workers.jobs.JobReporter, "on_epoch", flaky)
    assert run_job(job_id, settings=settings) is None  # no outcome recorded: it may not be reachable
    with session_scope(settings) as s:
        job = s.get(JobRow, job_id)
        assert job is not None and job.status == JobStatus.RUNNING and job.error is None
    assert has_state(checkpoint_dir(settings, job_id))  # the first epoch's checkpoint stays

    monkeypatch.setattr(workers.jobs.JobReporter, "on_epoch", real_on_epoch)
    heartbeat_stops(settings, job_id)  # what the stopped heartbeat looks like three periods later
    assert run_job(job_id, settings=settings) == JobStatus.SUCCEEDED
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["attempts"] == 2 and [r["epoch"] for r in j["history"]] == [0, 1, 2]
    assert j["progress"].get("resumed_from") == {"member": 1, "epoch": 1}


def test_a_lost_artifact_store_leaves_the_job_to_resume_not_failed(client, settings, monkeypatch) -> None:
    from service.storage import StoreUnavailable
    from workers.checkpoints import JobCheckpoint

    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    job_id = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 3}).json()["id"]
    real_push = JobCheckpoint.push
    calls = {"n": 0}

    def flaky(self, name):  # the second epoch's checkpoint meets a store that has just gone away
        calls["n"] += 1
        if calls["n"] == 2:
            raise StoreUnavailable("s3://bucket/zoofit: cannot reach http://minio:9000")
        return real_push(self, name)

    monkeypatch.setattr(JobCheckpoint, "push", flaky)
    assert run_job(job_id, settings=settings) is None  # no outcome: the attempt ends, the job waits
    with session_scope(settings) as s:
        job = s.get(JobRow, job_id)
        assert job is not None and job.status == JobStatus.RUNNING and job.error is None

    monkeypatch.setattr(JobCheckpoint, "push", real_push)
    heartbeat_stops(settings, job_id)
    assert run_job(job_id, settings=settings) == JobStatus.SUCCEEDED
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["attempts"] == 2 and [r["epoch"] for r in j["history"]] == [0, 1, 2]


def test_a_checkpoint_the_store_cannot_remove_after_the_outcome_is_swept_later(client, settings, monkeypatch) -> None:
    from sqlalchemy import select

    from service.db import UnpublishedRow
    from service.storage import StoreUnavailable
    from service.storage.local import LocalStore

    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    job_id = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()["id"]

    def away(self, prefix):
        raise StoreUnavailable("s3://bucket/zoofit: cannot reach http://minio:9000")

    monkeypatch.setattr(LocalStore, "delete_tree", away)
    assert run_job(job_id, settings=settings) == JobStatus.SUCCEEDED  # recorded; the checkpoint waits
    with session_scope(settings) as s:
        assert s.scalars(select(UnpublishedRow.key)).all() == [f"checkpoints/{job_id}"]


def test_an_error_after_the_model_is_published_never_removes_its_files(client, settings, monkeypatch) -> None:
    from workers.checkpoints import JobCheckpoint

    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    job_id = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()["id"]

    def broken(self):  # e.g. Celery's soft time limit arriving right after the model's commit
        raise RuntimeError("interrupted")

    monkeypatch.setattr(JobCheckpoint, "drop", broken)
    run_job(job_id, settings=settings)
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["status"] == "succeeded" and j["model_id"]
    assert (settings.models_dir / j["model_id"] / "model.safetensors").is_file()
    assert client.get(f"/v1/models/{j['model_id']}/report").status_code == 200
