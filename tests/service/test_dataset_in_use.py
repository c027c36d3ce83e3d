"""A dataset cannot be deleted from under a job that is training on it."""

from __future__ import annotations

from tests.utils.data import TINY_JOB, animals_zip
from tests.utils.workers import heartbeat_stops
from workers.jobs import claim_job, run_job


def test_dataset_of_a_running_job_is_409_until_the_job_ends(client, settings):
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 1}).json()
    assert claim_job(job["id"], "w1", redelivered=False, settings=settings)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"

    r = client.delete(f"/v1/datasets/{ds['id']}")
    assert r.status_code == 409 and job["id"] in r.json()["detail"]
    assert (settings.datasets_dir / ds["id"]).is_dir()  # nothing was removed

    # the worker dies; its redelivered message finishes the job, then the dataset may go
    heartbeat_stops(settings, job["id"])
    assert run_job(job["id"], settings=settings, redelivered=True) == "succeeded"
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
