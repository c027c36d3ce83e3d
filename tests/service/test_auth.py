"""API keys, tenant isolation and Idempotency-Key."""

from __future__ import annotations

from service.db import ApiKeyRow, session_scope
from tests.conftest import api_client, issue_key
from tests.utils.data import TINY_JOB, animals_zip
from workers.jobs import run_job


def _upload(c, **kw):
    return c.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}, **kw)


def test_every_v1_route_needs_a_key(settings):
    with api_client(settings, tenant=None) as anon:
        for method, path in [("get", "/v1/datasets"), ("get", "/v1/jobs"), ("get", "/v1/models"),
                             ("get", "/v1/backbones"), ("get", "/v1/jobs/x"), ("post", "/v1/jobs"),
                             ("get", "/v1/keys")]:
            r = getattr(anon, method)(path)
            assert r.status_code == 401, (path, r.status_code)
            assert "Authorization" in r.json()["detail"]
        assert anon.get("/v1/datasets", headers={"Authorization": "Bearer zf_nope"}).status_code == 401
        assert anon.get("/v1/datasets", headers={"Authorization": "Basic abc"}).status_code == 401
        assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200


def test_only_hash_is_stored(settings):
    key = issue_key(settings, "alice")
    with session_scope(settings) as s:
        rows = s.query(ApiKeyRow).all()
        assert len(rows) == 1 and key not in rows[0].key_hash and len(key) > 40


def test_tenants_cannot_see_each_other(settings, enqueued):
    with api_client(settings, "alice", enqueued.append) as alice, \
            api_client(settings, "bob", enqueued.append) as bob:
        ds = _upload(alice).json()
        job = alice.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()
        assert run_job(job["id"], settings=settings) == "succeeded"
        model_id = alice.get(f"/v1/jobs/{job['id']}").json()["model_id"]

        # bob gets exactly what a missing id gets
        for path in (f"/v1/datasets/{ds['id']}", f"/v1/jobs/{job['id']}", f"/v1/models/{model_id}"):
            mine, missing = bob.get(path), bob.get(path[:-4] + "dead")
            assert mine.status_code == missing.status_code == 404
        assert bob.get("/v1/datasets").json()["count"] == 0
        assert bob.get("/v1/jobs").json()["count"] == 0
        assert bob.get("/v1/models").json()["count"] == 0
        assert bob.post(f"/v1/models/{model_id}/predict",
                        files=[("files", ("a.png", animals_zip(1, 2)[:10], "image/png"))]).status_code == 404
        assert bob.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).status_code == 404
        assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert bob.delete(f"/v1/models/{model_id}").status_code == 404
        assert bob.delete(f"/v1/datasets/{ds['id']}").status_code == 404
        # alice still has everything
        assert alice.get(f"/v1/models/{model_id}").status_code == 200
        assert alice.get(f"/v1/datasets/{ds['id']}").status_code == 200


def test_admin_issues_and_revokes_keys(settings):
    with api_client(settings, "ops") as plain:
        assert plain.post("/v1/keys", json={"tenant": "carol"}).status_code == 403
    admin_key = issue_key(settings, "ops", admin=True)
    with api_client(settings, tenant=None) as c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        r = c.post("/v1/keys", json={"tenant": "carol"})
        assert r.status_code == 201
        carol_key, carol_id = r.json()["key"], r.json()["id"]
        assert all("key" not in k for k in c.get("/v1/keys").json()["data"])
        assert c.post("/v1/keys", json={"tenant": "../x"}).status_code == 422
        carol = {"Authorization": f"Bearer {carol_key}"}
        assert c.get("/v1/datasets", headers=carol).status_code == 200
        assert c.delete(f"/v1/keys/{carol_id}").json()["revoked"] is True
        assert c.get("/v1/datasets", headers=carol).status_code == 401


def test_auth_can_be_turned_off_for_local_use(make_settings):
    s = make_settings(auth_enabled="false")
    with api_client(s, tenant=None) as c:
        assert c.get("/v1/datasets").status_code == 200


def test_idempotency_key_returns_the_first_result(client, enqueued):
    h = {"Idempotency-Key": "upload-1"}
    first = _upload(client, headers=h)
    again = _upload(client, headers=h)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert client.get("/v1/datasets").json()["count"] == 1
    other = client.post("/v1/datasets", headers=h,
                        files={"file": ("b.zip", animals_zip(4, 2), "application/zip")})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]

    body = {"dataset_id": first.json()["id"], **TINY_JOB}
    j1 = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "job-1"})
    j2 = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "job-1"})
    assert j1.json()["id"] == j2.json()["id"] and enqueued == [j1.json()["id"]]
    assert client.post("/v1/jobs", json={**body, "epochs": 3},
                       headers={"Idempotency-Key": "job-1"}).status_code == 422
    assert client.get("/v1/jobs").json()["count"] == 1


def test_the_same_sample_archive_is_the_same_bytes_across_a_clock_tick(monkeypatch):
    # The idempotency test above compares two uploads of "the same" archive by their bytes; zip
    # entries carried the current time, so a 2-second tick between them made it a different request.
    import time as time_module

    first = animals_zip(3, 2)
    real = time_module.time
    monkeypatch.setattr(time_module, "time", lambda: real() + 3600)
    monkeypatch.setattr(time_module, "localtime", lambda t=None: time_module.gmtime(real() + 3600))
    assert animals_zip(3, 2) == first
