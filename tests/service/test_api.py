"""The HTTP API in-process (no worker): datasets, job validation, errors, health."""

from __future__ import annotations

import io

from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals_zip


def upload(client, data: bytes, filename: str = "animals.zip", **params):
    return client.post("/v1/datasets", files={"file": (filename, data, "application/zip")}, params=params)


def test_upload_lists_classes_and_counts(client, settings):
    r = upload(client, animals_zip(per_class=4, classes=3))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["classes"] == ["bear", "bird", "cat"]
    assert body["counts"] == {"bear": 4, "bird": 4, "cat": 4}
    assert body["num_images"] == 12
    stored = settings.datasets_dir / body["id"]
    assert sorted(p.name for p in stored.iterdir()) == ["bear", "bird", "cat"]
    assert client.get(f"/v1/datasets/{body['id']}").json()["counts"] == body["counts"]
    listing = client.get("/v1/datasets").json()
    assert listing["count"] == 1 and listing["data"][0]["id"] == body["id"]


def test_not_an_archive_is_400_and_leaves_nothing(client, settings):
    r = upload(client, b"this is not an archive at all" * 10, filename="data.zip")
    assert r.status_code == 400, r.text
    assert "archive" in r.json()["detail"].lower()
    assert list(settings.datasets_dir.iterdir()) == []
    assert list(settings.tmp_dir.iterdir()) == []


def test_upload_over_size_cap_is_413(make_settings):
    s = make_settings(upload_max_bytes="1000")
    with api_client(s) as c:
        r = upload(c, animals_zip(per_class=4, classes=2))
    assert r.status_code == 413, r.text
    assert "1000" in r.json()["detail"]
    assert list(s.datasets_dir.iterdir()) == []
    assert list(s.tmp_dir.iterdir()) == []


def test_delete_dataset(client, settings):
    ds = upload(client, animals_zip(per_class=3, classes=2)).json()
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert not (settings.datasets_dir / ds["id"]).exists()


def test_delete_dataset_used_by_queued_job_is_409(client):
    ds = upload(client, animals_zip(per_class=3, classes=2)).json()
    assert client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).status_code == 202
    r = client.delete(f"/v1/datasets/{ds['id']}")
    assert r.status_code == 409 and "unfinished jobs" in r.json()["detail"]


def test_submit_job_is_queued_and_enqueued(client, enqueued):
    ds = upload(client, animals_zip(per_class=3, classes=2)).json()
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert enqueued == [job["id"]]
    assert job["spec"]["backbone"] == "test_efficientnet"
    assert job["spec"]["optimizer"]["name"] == "adam"
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["status"] == "queued" and got["history"] == []
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["count"] == 1
    assert client.get("/v1/jobs", params={"status": "running"}).json()["count"] == 0


def test_job_on_missing_dataset_is_404(client, enqueued):
    r = client.post("/v1/jobs", json={"dataset_id": "nope", **TINY_JOB})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert enqueued == []


def _error_text(r) -> str:
    """A 422's messages (each names its field in ``errors``; ``detail`` sums them up in one line)."""
    body = r.json()
    assert r.headers["content-type"] == "application/problem+json" and body["status"] == r.status_code, r.text
    return " ".join(e["message"] for e in body["errors"])


def test_unknown_names_are_422_listing_valid_ones(client):
    ds = upload(client, animals_zip(per_class=3, classes=2)).json()
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "optimizer": {"name": "adamax9"}})
    assert r.status_code == 422
    assert "adamax9" in _error_text(r) and "nesterov" in _error_text(r) and "rmsprop" in _error_text(r)
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "schedule": {"name": "zigzag"}})
    assert r.status_code == 422 and "cosine" in _error_text(r)
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "backbone": "resnet9000"})
    assert r.status_code == 422 and "tf_efficientnet_lite0" in _error_text(r)
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "backbone": "resnet18", "weights": "bundled"})
    assert r.status_code == 422 and "no bundled weights" in _error_text(r)
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "epochs": 0})
    assert r.status_code == 422
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "learning_rate": 0.1})
    assert r.status_code == 422 and "learning_rate" in r.text


def test_cancel_queued_job(client):
    ds = upload(client, animals_zip(per_class=3, classes=2)).json()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_broker_down_is_503_and_no_job_left(client, enqueued):
    from service.api.deps import get_enqueue

    def broken(_job_id: str) -> None:
        raise ConnectionError("connection refused")

    client.app.dependency_overrides[get_enqueue] = lambda: broken
    ds = upload(client, animals_zip(per_class=3, classes=2)).json()
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB})
    assert r.status_code == 503 and "broker" in r.json()["detail"]
    assert client.get("/v1/jobs").json()["count"] == 0


def test_missing_things_are_404(client):
    for path in ("/v1/datasets/x", "/v1/jobs/x", "/v1/models/x"):
        r = client.get(path)
        assert r.status_code == 404 and "not found" in r.json()["detail"]
    r = client.post("/v1/models/x/predict", files=[("files", ("a.png", io.BytesIO(b"x"), "image/png"))])
    assert r.status_code == 404


def test_backbones_lists_the_zoo(client):
    body = client.get("/v1/backbones").json()
    cards = {c["name"]: c for c in body["data"]}
    lite0 = cards["tf_efficientnet_lite0"]
    assert "bundled" in lite0["weight_sources"] and "none" in lite0["weight_sources"]
    assert 4_000_000 < lite0["parameters"] < 6_000_000
    assert lite0["input_size"] == 224 and lite0["mean"] == [0.5, 0.5, 0.5]
    assert "bundled" not in cards["resnet18"]["weight_sources"]


def test_health_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["database"] == "ok" and r.json()["broker"] == "ok"
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_readyz_reports_unreachable_broker(make_settings):
    s = make_settings(broker_url="redis://127.0.0.1:1/0")
    with api_client(s, tenant=None) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["database"] == "ok" and r.json()["broker"].startswith("error")


def test_oversized_bodies_are_refused_before_parsing(make_settings):
    s = make_settings(predict_max_bytes="1000")
    with api_client(s) as c:
        big = b"x" * (3 * 1024 * 1024)
        r = c.post("/v1/models/abc/predict", files=[("files", ("a.png", big, "image/png"))])
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        # a JSON body on a small route, sent chunked (no Content-Length)
        r = c.post("/v1/jobs", content=iter([b"{" + b" " * 1024 * 1024, b" " * 1024 * 1024 + b"}"]),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/healthz").status_code == 200


def test_techniques_that_do_not_fit_are_422_saying_why(client, enqueued):
    ds = upload(client, animals_zip(per_class=3, classes=2)).json()
    lbfgs = {"dataset_id": ds["id"], "optimizer": {"name": "lbfgs"}, "head_dropout": 0.0}
    r = client.post("/v1/jobs", json={**lbfgs, "freeze": {"mode": "first_n"}})
    assert r.status_code == 422 and "L-BFGS fits only the linear head" in _error_text(r)
    r = client.post("/v1/jobs", json={**lbfgs, "freeze": {"mode": "linear_probe"}, "augment": {"preset": "strong"}})
    assert r.status_code == 422 and "mixup" in _error_text(r)
    r = client.post("/v1/jobs", json={**lbfgs, "freeze": {"mode": "linear_probe"}, "head_dropout": 0.3})
    assert r.status_code == 422 and "dropout" in _error_text(r)
    snapshot = {"members": 3, "snapshot": True}
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "epochs": 2, "ensemble": snapshot})
    assert r.status_code == 422 and "snapshot" in _error_text(r)
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "sweep": {"lr": [0.1, 0.001]}})
    assert r.status_code == 422 and "log-uniform" in _error_text(r)
    assert enqueued == []
    # The same recipe, made to fit, is accepted and the job record shows every field applied.
    r = client.post("/v1/jobs", json={**lbfgs, "freeze": {"mode": "linear_probe"}, "augment": {"preset": "light"}})
    assert r.status_code == 202, r.text
    spec = r.json()["spec"]
    assert spec["optimizer"]["name"] == "lbfgs" and spec["augment"]["crop_scale_min"] == 0.8


def test_readyz_names_the_dependency_that_is_down_not_its_address(make_settings, monkeypatch):
    from service.config import Settings, get_settings
    from service.queue import get_celery

    good = make_settings()
    bad_db = "postgresql+psycopg://secretuser:hunter2@127.0.0.1:1/nodb"
    with api_client(good, tenant=None) as c:
        bad = Settings(database_url=bad_db, data_dir=good.data_dir)
        c.app.dependency_overrides[get_settings] = lambda: bad  # type: ignore[attr-defined]
        monkeypatch.setenv("ZOOFIT_BROKER_URL", "redis://:brokerpw@127.0.0.1:2/0")
        get_settings.cache_clear()
        get_celery.cache_clear()
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["database"].startswith("error") and r.json()["broker"].startswith("error")
    for secret in ("secretuser", "hunter2", "brokerpw", "127.0.0.1", "nodb", ":1", ":2"):
        assert secret not in r.text, (secret, r.text)
