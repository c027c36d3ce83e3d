"""The evaluation report over HTTP: JSON, PNG figures, tenant isolation, and predict's ``tta``."""

from __future__ import annotations

from typing import get_args

from service.db import JobStatus, ModelRow, session_scope
from service.schemas import TTAMode
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals, animals_zip
from workers.jobs import run_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("curves", "confusion", "reliability")


def _trained_model(client, settings) -> str:
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(6, 3), "application/zip")})
    assert ds.status_code == 201, ds.text
    job = client.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **TINY_JOB, "ensemble": {"members": 2}})
    assert job.status_code == 202, job.text
    assert run_job(job.json()["id"], settings=settings) == JobStatus.SUCCEEDED
    return str(client.get(f"/v1/jobs/{job.json()['id']}").json()["model_id"])


def test_report_json_and_figures(client, settings) -> None:
    model_id = _trained_model(client, settings)
    r = client.get(f"/v1/models/{model_id}/report")
    assert r.status_code == 200, r.text
    report = r.json()
    ev = report["evaluation"]
    assert report["classes"] == ["bear", "bird", "cat"] and [c["label"] for c in ev["per_class"]] == report["classes"]
    assert sum(c["support"] for c in ev["per_class"]) == report["val_size"] == ev["size"] > 0
    assert sum(map(sum, ev["confusion"])) == report["val_size"] and len(ev["confusion"]) == 3
    assert set(ev["top_k_acc"]) == {"1"}  # 3 classes: top-3 would always be 1
    assert report["temperature"] == report["calibration"]["temperature"] > 0
    assert len(report["calibration"]["before"]["reliability"]) == report["calibration"]["bins"] == 15
    assert [len(c["epoch"]) for c in report["curves"]] == [TINY_JOB["epochs"]] * 2
    assert report["figures"]["curves"] == f"/v1/models/{model_id}/report/curves.png"
    # what ran is in the report: TINY_JOB fine-tunes everything, so the frozen-prefix cache is off, saying why
    applied = report["applied"]["members"]
    assert [a["member"] for a in applied] == [0, 1]
    assert applied[0]["transfer"]["mode"] == "none" and applied[0]["cache"]["path"] == "off"
    assert "nothing is frozen" in applied[0]["cache"]["reason"]
    assert report["comparison"]["ensemble_val_acc"] == report["val_acc"]
    # the model record's metrics are the same report (what the job stored)
    assert client.get(f"/v1/models/{model_id}").json()["metrics"]["evaluation"] == ev

    for name in FIGURES:
        r = client.get(report["figures"][name])
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.content.startswith(PNG_SIGNATURE)
        cached = settings.models_dir / model_id / "report" / f"{name}.png"
        assert cached.read_bytes() == r.content  # rendered once, then served from the model folder
        assert client.get(report["figures"][name]).content == r.content

    with api_client(settings, "bob") as bob:
        assert bob.get(f"/v1/models/{model_id}/report").status_code == 404
        for name in FIGURES:
            assert bob.get(f"/v1/models/{model_id}/report/{name}.png").status_code == 404
    assert client.get("/v1/models/nope/report").status_code == 404
    assert client.get(f"/v1/models/{model_id}/report/pie.png").status_code == 404


def test_predict_tta_and_a_model_saved_without_a_report(client, settings) -> None:
    model_id = _trained_model(client, settings)
    with session_scope(settings) as s:
        row = s.get(ModelRow, model_id)
        assert row is not None
        row.manifest = {k: v for k, v in row.manifest.items() if k != "report"}
    r = client.get(f"/v1/models/{model_id}/report")
    assert r.status_code == 404 and "no evaluation report" in r.json()["detail"]
    assert client.get(f"/v1/models/{model_id}/report/confusion.png").status_code == 404

    # predict with test-time augmentation
    from service.sample_data import png_bytes

    _, test = animals(6, 2, 3)
    files = [("files", (f"{n}-{i}.png", png_bytes(img), "image/png")) for n, i, img in test[:4]]
    for tta in get_args(TTAMode):
        r = client.post(f"/v1/models/{model_id}/predict", files=files, params={"top_k": 3, "tta": tta})
        assert r.status_code == 200, r.text
        for p in r.json()["predictions"]:
            assert abs(sum(x["probability"] for x in p["top_k"]) - 1) < 1e-4
    r = client.post(f"/v1/models/{model_id}/predict", files=files, params={"tta": "bogus"})
    assert r.status_code == 422 and "five_crop" in r.text


def test_tta_modes_match_the_engine() -> None:
    from models.artifact import TTA_MODES

    assert get_args(TTAMode) == TTA_MODES
