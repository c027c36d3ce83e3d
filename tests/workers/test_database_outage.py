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
