"""A dataset cannot be deleted from under a job that is training on it."""

from __future__ import annotations

from tests.conftest import api_client
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


def test_a_dataset_deleted_while_a_job_is_submitted_is_never_trained_on(client, settings, monkeypatch):
    # The delete commits between the submission's first look at the dataset and its insert.
    import service.jobs

    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    real_fits = service.jobs.check_job_fits

    def delete_meanwhile(*args, **kwargs):
        with api_client(settings, "alice") as other:
            assert other.delete(f"/v1/datasets/{ds['id']}").status_code == 204
        return real_fits(*args, **kwargs)

    monkeypatch.setattr(service.jobs, "check_job_fits", delete_meanwhile)
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 1})
    assert r.status_code == 404 and ds["id"] in r.json()["detail"], r.text
    assert client.get("/v1/jobs").json()["count"] == 0
