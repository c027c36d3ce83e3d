"""GET /v1/datasets/{id}/samples and /thumbnails/{file}: only the stored images, only the tenant's."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import api_client
from tests.utils.data import animals_zip


def _dataset(client) -> dict:
    r = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(6, 3), "application/zip")})
    assert r.status_code == 201, r.text
    return r.json()


def test_samples_name_stored_files_and_thumbnails_decode_them(client, settings) -> None:
    ds = _dataset(client)
    r = client.get(f"/v1/datasets/{ds['id']}/samples", params={"per_class": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["label"] for c in body["data"]] == ds["classes"] == ["bear", "bird", "cat"]
    root = settings.datasets_dir / ds["id"]
    for c in body["data"]:
        assert c["count"] == ds["counts"][c["label"]] == 6 and len(c["files"]) == 4
        assert len(set(c["files"])) == 4
        assert all(f.startswith(c["label"] + "/") and (root / f).is_file() for f in c["files"])
    everything = client.get(f"/v1/datasets/{ds['id']}/samples", params={"per_class": 50}).json()["data"]
    assert [len(c["files"]) for c in everything] == [6, 6, 6]

    first = body["data"][0]["files"][0]
    r = client.get(f"/v1/datasets/{ds['id']}/thumbnails/{first}", params={"size": 64})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["cache-control"].startswith("private, max-age=")
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) <= 64
    for asked, most in ((1, 32), (4096, 256)):  # clamped
        img = Image.open(io.BytesIO(client.get(f"/v1/datasets/{ds['id']}/thumbnails/{first}?size={asked}").content))
        assert max(img.size) <= most
    assert client.get(f"/v1/datasets/{ds['id']}/thumbnails/{first}?size=0").status_code == 422
    assert raw_get(client, f"/v1/datasets/{ds['id']}/thumbnails/{first}")[0] == 200  # raw_get reaches it


def raw_get(client, path: str) -> tuple[int, dict]:
    """GET ``path`` byte for byte, as ``curl --path-as-is`` sends it: httpx would remove its dot segments.

    The ASGI scope is what uvicorn makes of such a request (``path`` is ``raw_path`` unquoted).
    """
    import asyncio
    import json
    from urllib.parse import unquote

    headers = [(b"host", b"testserver")] + [(k.lower().encode(), v.encode()) for k, v in client.headers.items()
                                            if k.lower() != "host"]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": unquote(path), "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(client.app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if body.startswith(b"{") else {}


@pytest.mark.parametrize(
    "path",
    [
        "../../zoofit.db",
        "../../../zoofit.db",
        "bear/../../zoofit.db",
        "bear/..",
        "bear/../bear/../../zoofit.db",
        "./bear/0.png",
        "bear/./0.png",
        "bear/%2E%2E",
        "bear/..%2F..%2F..%2Fzoofit.db",
        "%2E%2E/%2E%2E/zoofit.db",
        "..%2f..%2fzoofit.db",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "bear",
        "bear/",
        "bear/nope.png",
        "bear/.hidden.png",
        "dog/0.png",
        "bear/x/y.png",
        "bear\\..\\..\\zoofit.db",
    ],
)
def test_thumbnail_refuses_anything_the_dataset_does_not_hold(client, settings, path: str) -> None:
    ds = _dataset(client)
    (settings.datasets_dir / ds["id"] / "bear" / ".hidden.png").write_bytes(b"x")
    status, body = raw_get(client, f"/v1/datasets/{ds['id']}/thumbnails/{path}")
    # The thumbnail handler's own 404, not the router's "no route" for a path normalised elsewhere.
    assert status == 404 and "has no image" in body["detail"], (path, status, body)


def test_thumbnail_does_not_follow_symlinks(client, settings, tmp_path: Path) -> None:
    ds = _dataset(client)
    root = settings.datasets_dir / ds["id"]
    real = next((root / "bear").iterdir())
    secret = tmp_path / "secret.png"
    secret.write_bytes(real.read_bytes())
    os.symlink(secret, root / "bear" / "link.png")
    os.symlink(tmp_path, root / "linked-class")
    (tmp_path / "x.png").write_bytes(real.read_bytes())
    assert client.get(f"/v1/datasets/{ds['id']}/thumbnails/bear/{real.name}").status_code == 200
    assert client.get(f"/v1/datasets/{ds['id']}/thumbnails/bear/link.png").status_code == 404
    assert client.get(f"/v1/datasets/{ds['id']}/thumbnails/linked-class/x.png").status_code == 404
    samples = client.get(f"/v1/datasets/{ds['id']}/samples?per_class=50").json()["data"]
    assert "bear/link.png" not in samples[0]["files"]


def test_another_tenants_dataset_is_not_found(client, settings) -> None:
    ds = _dataset(client)
    name = client.get(f"/v1/datasets/{ds['id']}/samples").json()["data"][0]["files"][0]
    with api_client(settings, "bob") as bob:
        assert bob.get(f"/v1/datasets/{ds['id']}/samples").status_code == 404
        assert bob.get(f"/v1/datasets/{ds['id']}/thumbnails/{name}").status_code == 404
    assert client.get("/v1/datasets/nope/samples").status_code == 404
    assert client.get(f"/v1/datasets/nope/thumbnails/{name}").status_code == 404
    with api_client(settings, None) as anonymous:
        assert anonymous.get(f"/v1/datasets/{ds['id']}/thumbnails/{name}").status_code == 401


def test_operation_ids(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/v1/datasets/{dataset_id}/samples"]["get"]["operationId"] == "datasets-samples"
    assert paths["/v1/datasets/{dataset_id}/thumbnails/{file_path}"]["get"]["operationId"] == "datasets-thumbnail"


def test_thumbnails_do_not_take_predicts_decoding_slots(make_settings) -> None:
    from service.decoding import decode_slots

    settings = make_settings(predict_decode_wait_s="0.2")
    slots = decode_slots(settings.predict_decode_slots)
    with api_client(settings) as client:
        ds = _dataset(client)
        name = client.get(f"/v1/datasets/{ds['id']}/samples").json()["data"][0]["files"][0]
        taken = 0
        try:
            while slots.acquire(blocking=False):  # every predict decoding slot busy
                taken += 1
            r = client.get(f"/v1/datasets/{ds['id']}/thumbnails/{name}")
        finally:
            for _ in range(taken):
                slots.release()
    assert r.status_code == 200, r.text


def test_thumbnails_are_cached_and_answer_503_at_once_when_their_slots_are_busy(make_settings) -> None:
    from service.datasets import thumbnail_slots

    settings = make_settings(thumbnail_wait_s="0.1")
    slots = thumbnail_slots(settings.thumbnail_slots)
    with api_client(settings) as client:
        ds = _dataset(client)
        files = client.get(f"/v1/datasets/{ds['id']}/samples").json()["data"][0]["files"]
        url = f"/v1/datasets/{ds['id']}/thumbnails/{{}}?size=64"
        first = client.get(url.format(files[0]))
        assert first.status_code == 200, first.text
        taken = 0
        try:
            while slots.acquire(blocking=False):
                taken += 1
            again = client.get(url.format(files[0]))  # cached: no decoding, no slot
            other = client.get(url.format(files[1]))
            path = settings.datasets_dir / ds["id"] / files[0]
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced: the cache entry is stale
            changed = client.get(url.format(files[0]))
        finally:
            for _ in range(taken):
                slots.release()
        assert again.status_code == 200 and again.content == first.content
        for r in (other, changed):
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.headers["content-type"] == "application/problem+json"
        assert client.get(url.format(files[1])).status_code == 200
