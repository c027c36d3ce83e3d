"""The API and a worker on an S3 store (a real moto server): nothing of an artifact on the local disk.

Upload, thumbnails, training, predict, figures, exports and deletes, each checked against what
the bucket holds. The worker runs in-process here (``run_job``); tests/integration has the
separate processes on separate scratch dirs.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from sqlalchemy import select

from service.db import JobStatus, UnpublishedRow, session_scope
from service.sample_data import png_bytes
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals_zip
from tests.utils.s3 import bucket_keys
from workers.exports import run_export
from workers.jobs import run_job


@pytest.fixture
def stack(s3_settings, s3_settings_env, tmp_path):
    bucket = s3_settings_env["ZOOFIT_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    endpoint = s3_settings_env["ZOOFIT_S3_ENDPOINT_URL"]

    def keys(prefix: str) -> list[str]:
        return bucket_keys(endpoint, bucket, f"zoofit/{prefix}")

    with api_client(s3_settings) as client:
        yield client, s3_settings, keys


def _png() -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))


def _local_artifacts(settings) -> list[str]:
    """Files under the data dir that look like stored artifacts (there must be none)."""
    found = []
    for name in ("datasets", "models", "checkpoints"):
        folder = settings.data_dir / name
        if folder.exists():
            found += [str(p) for p in folder.rglob("*") if p.is_file()]
    return found


def test_a_dataset_lives_in_the_bucket_and_a_rejected_one_leaves_nothing(stack) -> None:
    client, settings, keys = stack
    r = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(4, 3), "application/zip")})
    assert r.status_code == 201, r.text
    ds = r.json()
    stored = keys(f"datasets/{ds['id']}/")
    assert len(stored) == ds["num_images"] == 12
    assert {k.split("/")[-2] for k in stored} == {"bear", "bird", "cat"}
    assert _local_artifacts(settings) == [] and list(settings.tmp_dir.iterdir()) == []

    samples = client.get(f"/v1/datasets/{ds['id']}/samples", params={"per_class": 2}).json()["data"]
    assert [(c["label"], c["count"], len(c["files"])) for c in samples] == [("bear", 4, 2), ("bird", 4, 2),
                                                                             ("cat", 4, 2)]
    thumb = client.get(f"/v1/datasets/{ds['id']}/thumbnails/{samples[0]['files'][0]}")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert client.get(f"/v1/datasets/{ds['id']}/thumbnails/bear/..%2Fbird%2F0.png").status_code == 404

    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("only/x.png", b"not an image")
    before = keys("")
    r = client.post("/v1/datasets", files={"file": ("bad.zip", bad.getvalue(), "application/zip")})
    assert r.status_code in (400, 422), r.text
    assert keys("") == before  # nothing of the rejected upload reached the bucket

    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert keys(f"datasets/{ds['id']}/") == []


def test_train_predict_report_export_and_delete_through_the_bucket(stack) -> None:
    client, settings, keys = stack
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(6, 3), "application/zip")}).json()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()
    assert run_job(job["id"], settings=settings) == JobStatus.SUCCEEDED
    model_id = client.get(f"/v1/jobs/{job['id']}").json()["model_id"]
    model_keys = keys(f"models/{model_id}/")
    assert {k.rsplit("/", 1)[-1] for k in model_keys} >= {"manifest.json", "model.safetensors"}
    assert keys(f"checkpoints/{job['id']}/") == []  # gone with the job's outcome
    assert _local_artifacts(settings) == []

    # the report is read from the stored manifest; its figure is rendered once and kept in the bucket
    assert client.get(f"/v1/models/{model_id}/report").json()["classes"] == ["bear", "bird", "cat"]
    png = client.get(f"/v1/models/{model_id}/report/confusion.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert keys(f"models/{model_id}/report/") == [f"zoofit/models/{model_id}/report/confusion.png"]

    # predict loads the model from this host's copy of it in the scratch dir
    r = client.post(f"/v1/models/{model_id}/predict", files=[("files", ("x.png", _png(), "image/png"))])
    assert r.status_code == 200, r.text
    copy = settings.cache_dir / "mirror" / "models" / model_id
    assert (copy / "model.safetensors").is_file() and not (copy / "report").exists()

    # an export is built by the worker and stored beside the model; the download streams from the bucket
    ex = client.post(f"/v1/models/{model_id}/exports", json={"format": "safetensors"}).json()
    assert run_export(ex["id"], settings=settings) == JobStatus.SUCCEEDED
    [bundle] = keys(f"models/{model_id}/exports/")
    assert bundle.startswith(f"zoofit/models/{model_id}/exports/{ex['id']}-") and bundle.endswith(".zip")
    dl = client.get(f"/v1/models/{model_id}/exports/{ex['id']}/download")
    assert dl.status_code == 200 and int(dl.headers["content-length"]) == len(dl.content) > 0
    assert zipfile.ZipFile(io.BytesIO(dl.content)).testzip() is None

    with session_scope(settings) as s:  # every upload was published by its record
        assert s.scalars(select(UnpublishedRow.key)).all() == []

    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert keys(f"models/{model_id}/") == [] and not copy.exists()
    assert client.post(f"/v1/models/{model_id}/predict",
                       files=[("files", ("x.png", _png(), "image/png"))]).status_code == 404


def test_an_upload_while_the_store_is_away_is_a_503_and_saves_nothing(make_settings) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(storage_url="s3://away/zoofit", s3_endpoint_url=f"http://127.0.0.1:{port}",
                             s3_access_key_id="k", s3_secret_access_key="s", s3_region="us-east-1")
    with api_client(settings) as client:
        r = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(2, 2), "application/zip")})
        assert r.status_code == 503, r.text
        assert r.json()["detail"] == "the artifact store is unavailable; retry in a few seconds"
        assert r.headers["retry-after"] == "5"
        assert client.get("/v1/datasets").json()["count"] == 0
    assert list(settings.tmp_dir.iterdir()) == []
