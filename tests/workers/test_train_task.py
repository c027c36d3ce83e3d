"""The training task's functions called directly (no broker), on the embedded SQLite store."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from service.db import JobRow, JobStatus, session_scope
from tests.utils.data import TINY_JOB, animals, animals_zip
from tests.utils.workers import heartbeat_stops
from workers.jobs import claim_job, run_job


def _submit(client, job: dict | None = None, per_class: int = 6, classes: int = 3) -> tuple[dict, dict]:
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(per_class, classes), "application/zip")})
    assert ds.status_code == 201, ds.text
    r = client.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **(job or TINY_JOB)})
    assert r.status_code == 202, r.text
    return ds.json(), r.json()


def test_run_job_trains_records_history_and_stores_model(client, settings):
    from service.sample_data import png_bytes

    job_spec = {**TINY_JOB, "ensemble": {"members": 2}}
    _, job = _submit(client, job_spec)
    assert run_job(job["id"], settings=settings) == JobStatus.SUCCEEDED

    j = client.get(f"/v1/jobs/{job['id']}").json()
    assert j["status"] == "succeeded" and j["error"] is None
    assert len(j["history"]) == 2 * TINY_JOB["epochs"]  # two members, every epoch recorded
    assert {h["member"] for h in j["history"]} == {0, 1}
    assert all(0.0 <= h["val_acc"] <= 1.0 and h["lr"] > 0 for h in j["history"])
    assert len(j["metrics"]["member_val_acc"]) == 2

    m = client.get(f"/v1/models/{j['model_id']}").json()
    assert m["classes"] == ["bear", "bird", "cat"] and len(m["members"]) == 2
    model_dir = settings.models_dir / j["model_id"]
    assert (model_dir / "model.safetensors").exists() and (model_dir / "manifest.json").exists()
    assert not list(model_dir.glob("*.p*t*")) and not list(model_dir.glob("*.pkl"))

    _, test = animals(6, 2, 3)
    files = [("files", (f"{n}-{i}.png", png_bytes(img), "image/png")) for n, i, img in test]
    r = client.post(f"/v1/models/{j['model_id']}/predict", files=files, params={"top_k": 2})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["file"] for p in preds] == [f[1][0] for f in files]
    for p in preds:
        assert len(p["top_k"]) == 2
        assert p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
        assert p["top_k"][0]["label"] in m["classes"]

    r = client.post(f"/v1/models/{j['model_id']}/predict",
                    files=[("files", ("ok.png", png_bytes(test[0][2]), "image/png")),
                           ("files", ("broken.jpg", b"\xff\xd8\xff garbage", "image/jpeg"))])
    assert r.status_code == 400 and "broken.jpg" in r.json()["detail"]

    # running it again (a redelivered message) is a no-op: the job is finished
    assert run_job(job["id"], settings=settings) is None
    assert client.delete(f"/v1/models/{j['model_id']}").status_code == 204
    assert not model_dir.exists()


def test_failing_job_records_its_error(client, settings):
    ds, job = _submit(client)
    shutil.rmtree(settings.datasets_dir / ds["id"] / "bird")  # the data vanished under the job
    assert run_job(job["id"], settings=settings) == JobStatus.FAILED
    j = client.get(f"/v1/jobs/{job['id']}").json()
    assert j["status"] == "failed"
    assert "bird" in j["error"]
    assert j["model_id"] is None and client.get("/v1/models").json()["count"] == 0
    assert list(settings.models_dir.iterdir()) == []


def test_running_job_can_be_cancelled(client, settings):
    _, job = _submit(client, {**TINY_JOB, "epochs": 200})
    outcome: list = []
    t = threading.Thread(target=lambda: outcome.append(run_job(job["id"], settings=settings)))
    t.start()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    t.join(60)
    assert outcome == [JobStatus.CANCELLED]
    j = client.get(f"/v1/jobs/{job['id']}").json()
    assert j["status"] == "cancelled" and len(j["history"]) < 200
    assert list(settings.models_dir.iterdir()) == []


def test_claim_is_guarded(client, settings):
    _, job = _submit(client)
    assert claim_job(job["id"], "w1", redelivered=False, settings=settings) == 1
    # a second worker receiving the same message while w1 is alive does not take it,
    assert not claim_job(job["id"], "w2", redelivered=False, settings=settings)
    # nor does a redelivered one (a broker reconnect, the visibility timeout: w1 lives on)
    assert not claim_job(job["id"], "w2", redelivered=True, settings=settings)
    # ...but once w1's heartbeat is stale (w1 died), a redelivered message takes it over
    heartbeat_stops(settings, job["id"])
    assert claim_job(job["id"], "w3", redelivered=True, settings=settings) == 2
    with session_scope(settings) as s:
        row = s.get(JobRow, job["id"])
        assert row.worker == "w3" and row.attempts == 2
    assert not claim_job("missing", "w1", redelivered=False, settings=settings)


def test_cancelled_before_start_never_trains(client, settings):
    _, job = _submit(client)
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert run_job(job["id"], settings=settings) is None
    assert client.get(f"/v1/jobs/{job['id']}").json()["history"] == []
    assert Path(settings.models_dir).exists() and list(settings.models_dir.iterdir()) == []


def test_torch_threads_setting_reaches_training(make_settings, monkeypatch):
    import models.training

    settings = make_settings(torch_threads="1")
    real = models.training.train
    seen: list = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_threads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models.training, "train", spy)
    from tests.conftest import api_client

    with api_client(settings) as c:
        _, job = _submit(c, {**TINY_JOB, "epochs": 1})
    assert run_job(job["id"], settings=settings) == JobStatus.SUCCEEDED
    assert seen == [1]
