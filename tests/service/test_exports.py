"""Exports over HTTP: records, idempotent requests, the worker's build, download, tenants, deletion,
and a user's onnxruntime-only script (the model card's example) giving the API's answers."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from service.api.deps import get_enqueue_export
from service.db import JobStatus
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals, animals_zip
from workers.exports import run_export
from workers.jobs import run_job


@pytest.fixture
def sent() -> list[str]:
    return []


@pytest.fixture
def client(settings, sent):
    with api_client(settings) as c:
        c.app.dependency_overrides[get_enqueue_export] = lambda: sent.append  # type: ignore[attr-defined]
        yield c


def _trained_model(client, settings) -> str:
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(6, 3), "application/zip")})
    assert ds.status_code == 201, ds.text
    job = client.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **TINY_JOB, "ensemble": {"members": 2}})
    assert run_job(job.json()["id"], settings=settings) == JobStatus.SUCCEEDED
    return str(client.get(f"/v1/jobs/{job.json()['id']}").json()["model_id"])


def _card_example(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_onnx_export_end_to_end_and_a_torch_free_script_gives_the_apis_answers(
    client, settings, sent, tmp_path: Path
) -> None:
    model_id = _trained_model(client, settings)
    r = client.post(f"/v1/models/{model_id}/exports", json={"format": "onnx"})
    assert r.status_code == 202, r.text
    export = r.json()
    assert export["status"] == "queued" and export["download"] is None and sent == [export["id"]]
    again = client.post(f"/v1/models/{model_id}/exports", json={"format": "onnx"})
    assert again.json()["id"] == export["id"] and sent == [export["id"]]  # the same export, not sent twice
    url = f"/v1/models/{model_id}/exports/{export['id']}"
    assert client.get(url + "/download").status_code == 409  # not built yet

    assert run_export(export["id"], settings=settings) == JobStatus.SUCCEEDED
    assert run_export(export["id"], settings=settings) is None  # a redelivered message does nothing
    done = client.get(url).json()
    assert done["status"] == "succeeded" and done["download"] == url + "/download"
    assert done["details"]["fidelity"]["max_abs_diff"] <= 1e-4 and done["details"]["fidelity"]["top1_agreement"] == 1
    assert client.post(f"/v1/models/{model_id}/exports", json={"format": "onnx"}).status_code == 200
    listed = client.get(f"/v1/models/{model_id}/exports").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == export["id"]

    z = client.get(url + "/download")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    assert f"zoofit-{model_id}-onnx.zip" in z.headers["content-disposition"]
    bundle = tmp_path / "bundle"
    zipfile.ZipFile(io.BytesIO(z.content)).extractall(bundle)

    # A user's script: the card's ten lines, with torch made unimportable, on a saved image.
    _, test = animals()
    photos = []
    for i, (_, _label, img) in enumerate(test[:4]):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(img).resize((45, 37)).save(path)  # not square, not the model size
        photos.append(path)
    code = _card_example((bundle / "README.md").read_text())
    assert "torch" not in code
    for photo in photos:
        script = "import sys\nsys.modules['torch'] = None\n" + code.replace("photo.jpg", str(photo))
        out = subprocess.run([sys.executable, "-c", script], cwd=bundle, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        theirs = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        api = client.post(f"/v1/models/{model_id}/predict", params={"top_k": 5},
                          files={"files": (photo.name, photo.read_bytes(), "image/png")}).json()
        ours = api["predictions"][0]["top_k"]
        assert [lbl for _, lbl in theirs] == [p["label"] for p in ours]
        assert max(abs(p - q["probability"]) for (p, _), q in zip(theirs, ours, strict=True)) <= 1e-4


def test_tenants_validation_quantization_and_deletion(client, settings, sent) -> None:
    model_id = _trained_model(client, settings)
    assert client.post(f"/v1/models/{model_id}/exports",
                       json={"format": "torchscript", "quantization": "int8_static"}).status_code == 422
    assert client.post(f"/v1/models/{model_id}/exports", json={"format": "tflite"}).status_code == 422
    assert client.post("/v1/models/nope/exports", json={"format": "onnx"}).status_code == 404

    q = client.post(f"/v1/models/{model_id}/exports", json={"format": "onnx", "quantization": "int8_static"}).json()
    ts = client.post(f"/v1/models/{model_id}/exports", json={"format": "torchscript"}).json()
    with api_client(settings, "bob") as bob:
        assert bob.get(f"/v1/models/{model_id}/exports").status_code == 404
        assert bob.post(f"/v1/models/{model_id}/exports", json={"format": "onnx"}).status_code == 404
        assert bob.get(f"/v1/models/{model_id}/exports/{q['id']}").status_code == 404
        assert bob.get(f"/v1/models/{model_id}/exports/{q['id']}/download").status_code == 404

    status = run_export(q["id"], settings=settings)
    got = client.get(f"/v1/models/{model_id}/exports/{q['id']}").json()
    change = got["details"]["int8"]
    assert change["images"] > 0 and "fp32_top1" in change
    # refused exactly when top-1 drops more than a point, and the error names the figure
    assert (status == JobStatus.FAILED) == (change["delta_points"] < -1.0)
    if status == JobStatus.FAILED:
        assert f"{-change['delta_points']:.2f} points" in got["error"]
    assert run_export(ts["id"], settings=settings) == JobStatus.SUCCEEDED
    [bundle] = Path(settings.models_dir / model_id / "exports").glob(f"{ts['id']}-*.zip")  # one build's bundle
    assert bundle.is_file()

    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert not bundle.exists()
    assert client.get(f"/v1/models/{model_id}/exports").status_code == 404
    from service.db import ExportRow, session_scope

    with session_scope(settings) as s:
        assert s.query(ExportRow).filter_by(model_id=model_id).count() == 0


def test_a_failed_export_is_queued_again_when_asked_again(client, settings, sent, monkeypatch) -> None:
    model_id = _trained_model(client, settings)
    import models.bundle
    from models.export import ExportError

    def refuse(*_a, **_k):
        raise ExportError("no room")

    monkeypatch.setattr(models.bundle, "build_bundle", refuse)
    e = client.post(f"/v1/models/{model_id}/exports", json={"format": "torchscript"}).json()
    assert run_export(e["id"], settings=settings) == JobStatus.FAILED
    failed = client.get(f"/v1/models/{model_id}/exports/{e['id']}").json()
    assert failed["status"] == "failed" and "no room" in failed["error"]
    assert client.get(f"/v1/models/{model_id}/exports/{e['id']}/download").status_code == 409
    monkeypatch.undo()
    again = client.post(f"/v1/models/{model_id}/exports", json={"format": "torchscript"})
    assert again.status_code == 202 and again.json()["id"] == e["id"] and again.json()["status"] == "queued"
    assert sent == [e["id"], e["id"]]
    assert run_export(e["id"], settings=settings) == JobStatus.SUCCEEDED
    assert json.loads(zipfile.ZipFile(io.BytesIO(
        client.get(f"/v1/models/{model_id}/exports/{e['id']}/download").content)).read("labels.json")) == [
        "bear", "bird", "cat"]


def test_an_export_whose_worker_died_is_queued_again_when_asked_again(client, settings, sent) -> None:
    from datetime import timedelta

    from service.db import ExportRow, session_scope, utcnow
    from service.exports import EXPORT_STALE_S

    model_id = _trained_model(client, settings)
    first = client.post(f"/v1/models/{model_id}/exports", json={"format": "safetensors"}).json()
    assert sent == [first["id"]]
    # a worker claimed it, then was killed mid-build: the record stays "running"
    with session_scope(settings) as s:
        row = s.get(ExportRow, first["id"])
        row.status, row.started_at = JobStatus.RUNNING, utcnow() - timedelta(seconds=60)
    again = client.post(f"/v1/models/{model_id}/exports", json={"format": "safetensors"})
    assert again.json()["status"] == "running" and sent == [first["id"]]  # still building, not sent twice
    with session_scope(settings) as s:
        s.get(ExportRow, first["id"]).started_at = utcnow() - timedelta(seconds=EXPORT_STALE_S + 60)
    again = client.post(f"/v1/models/{model_id}/exports", json={"format": "safetensors"})
    assert again.status_code == 202 and again.json()["status"] == "queued"
    assert sent == [first["id"], first["id"]]
    assert run_export(first["id"], settings=settings) == JobStatus.SUCCEEDED
