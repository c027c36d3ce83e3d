"""Restarting the API loses nothing: the database and the data folder are the whole state."""

from __future__ import annotations

from service.sample_data import png_bytes
from tests.conftest import api_client, issue_key
from tests.utils.data import TINY_JOB, animals, animals_zip
from workers.jobs import run_job


def test_a_fresh_app_serves_everything_the_old_one_created(settings):
    key = issue_key(settings, "alice")
    image = png_bytes(animals(3, 2, 2)[1][0][2])
    with api_client(settings, tenant=None, enqueue=lambda _job_id: None) as first:
        first.headers["Authorization"] = f"Bearer {key}"
        ds = first.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
        done = first.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 1}).json()
        assert run_job(done["id"], settings=settings) == "succeeded"
        queued = first.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 1}).json()
        model_id = first.get(f"/v1/jobs/{done['id']}").json()["model_id"]
        before = {
            "dataset": first.get(f"/v1/datasets/{ds['id']}").json(),
            "done": first.get(f"/v1/jobs/{done['id']}").json(),
            "queued": first.get(f"/v1/jobs/{queued['id']}").json(),
            "model": first.get(f"/v1/models/{model_id}").json(),
        }
        prediction = first.post(f"/v1/models/{model_id}/predict",
                                files=[("files", ("a.png", image, "image/png"))]).json()

    # A new process would build a new app from the same settings: nothing is held in memory.
    with api_client(settings, tenant=None, enqueue=lambda _job_id: None) as second:
        second.headers["Authorization"] = f"Bearer {key}"  # the key survived too
        after = {
            "dataset": second.get(f"/v1/datasets/{ds['id']}").json(),
            "done": second.get(f"/v1/jobs/{done['id']}").json(),
            "queued": second.get(f"/v1/jobs/{queued['id']}").json(),
            "model": second.get(f"/v1/models/{model_id}").json(),
        }
        assert after == before
        assert second.get("/v1/jobs").json()["count"] == 2
        again = second.post(f"/v1/models/{model_id}/predict", files=[("files", ("a.png", image, "image/png"))])
        assert again.status_code == 200 and again.json() == prediction
        # the dataset is still guarded by its unfinished job, read back from the database
        assert second.delete(f"/v1/datasets/{ds['id']}").status_code == 409
        # the queued job is still claimable by a worker after the restart
        assert run_job(queued["id"], settings=settings) == "succeeded"
        assert second.delete(f"/v1/datasets/{ds['id']}").status_code == 204


def test_start_up_sweeps_partial_uploads_of_a_killed_process(settings):
    """A SIGKILLed API leaves its temporary upload and half-extracted folder; the next start removes them."""
    import os
    import time

    from tests.conftest import api_client

    old = time.time() - 2 * 3600
    stale_upload = settings.tmp_dir / "upload-deadbeef"
    stale_upload.write_bytes(b"partial archive")
    stale_ingest = settings.datasets_dir / ".abc123.ingest-0a0b0c"
    (stale_ingest / ".incoming").mkdir(parents=True)
    (stale_ingest / ".incoming" / "0").write_bytes(b"x")
    for p in (stale_upload, stale_ingest):
        os.utime(p, (old, old))
    fresh = settings.tmp_dir / "upload-inprogress"  # another process's upload in flight
    fresh.write_bytes(b"still arriving")
    with api_client(settings) as c:
        assert c.get("/healthz").status_code == 200
    assert not stale_upload.exists() and not stale_ingest.exists()
    assert fresh.exists()
