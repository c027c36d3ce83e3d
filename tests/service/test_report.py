"""The evaluation report over HTTP: JSON, PNG figures, tenant isolation, and predict's ``tta``."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from pydantic import ValidationError

from service import models_store
from service.db import JobRow, JobStatus, ModelRow, session_scope
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
    # each validation image's prediction comes with the report only, not with every job or model poll
    assert len(report["val_predictions"]) == report["val_size"]
    assert client.get(f"/v1/models/{model_id}").json()["metrics"]["val_predictions"] is None
    job_id = client.get(f"/v1/models/{model_id}").json()["job_id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["metrics"]["val_predictions"] is None

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
        manifest_file = settings.data_dir / row.store_key / "manifest.json"  # the report's one stored copy
        manifest = json.loads(manifest_file.read_text())
        manifest_file.write_text(json.dumps({k: v for k, v in manifest.items() if k != "report"}))
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


def test_the_report_is_stored_once_and_lists_carry_its_summary(client, settings) -> None:
    model_id = _trained_model(client, settings)
    with session_scope(settings) as s:
        row = s.get(ModelRow, model_id)
        assert row is not None
        job_metrics = s.get(JobRow, row.job_id).metrics
        stored = {"model metrics": row.metrics, "model manifest": row.manifest, "job metrics": job_metrics}
        folder = settings.data_dir / row.store_key
    # One copy: the model folder's manifest. The database keeps only the summary.
    for where, value in stored.items():
        assert "evaluation" not in value and "report" not in value and "curves" not in value, where
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert "confusion" in on_disk["report"]["evaluation"] and "evaluation" not in on_disk["metrics"]
    summary_keys = set(on_disk["metrics"])
    assert {"val_acc", "member_val_acc", "num_classes", "val_size"} <= summary_keys

    listed_model = client.get("/v1/models").json()["data"][0]
    assert listed_model["id"] == model_id and set(listed_model["metrics"]) == summary_keys
    listed_job = client.get("/v1/jobs").json()["data"][0]
    assert set(listed_job["metrics"]) == summary_keys and "history" not in listed_job
    # One model or one job: the whole report, read from its one copy.
    full = client.get(f"/v1/models/{model_id}/report").json()
    assert client.get(f"/v1/models/{model_id}").json()["metrics"]["evaluation"] == full["evaluation"]
    job = client.get(f"/v1/jobs/{listed_job['id']}").json()
    assert job["metrics"]["calibration"] == full["calibration"] and len(job["history"]) == TINY_JOB["epochs"] * 2


def test_openapi_documents_the_report_from_the_engine_types(client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    report = schemas["ReportPublic"]["properties"]
    assert report["evaluation"] == {"$ref": "#/components/schemas/Evaluation"}
    assert report["calibration"] == {"$ref": "#/components/schemas/Calibration"}
    assert "confusion" in schemas["Evaluation"]["properties"]
    assert "reliability" in schemas["CalibrationState"]["properties"]
    summary = schemas["ReportSummary"]["properties"]
    assert "evaluation" not in summary and "val_acc" in summary
    listed = schemas["ModelSummaryPublic"]["properties"]["metrics"]
    assert listed == {"$ref": "#/components/schemas/ReportSummary"}


def test_rows_written_by_the_previous_release_read_back(client, settings) -> None:
    # The previous release kept the whole report in the job's and the model's metrics and in the
    # manifest column too; an earlier one had no temperature. Lists summarise, details show it all.
    model_id = _trained_model(client, settings)
    full = client.get(f"/v1/models/{model_id}/report").json()
    old_report = {k: v for k, v in full.items() if k not in ("model_id", "figures", "sweep")}
    with session_scope(settings) as s:
        row = s.get(ModelRow, model_id)
        assert row is not None
        job = s.get(JobRow, row.job_id)
        row.metrics = job.metrics = old_report
        row.manifest = {**row.manifest, "metrics": old_report, "report": old_report}
        manifest_file = settings.data_dir / row.store_key / "manifest.json"
        on_disk = json.loads(manifest_file.read_text())
        manifest_file.write_text(json.dumps({**on_disk, "metrics": old_report, "report": old_report}))
    listed = client.get("/v1/models").json()["data"][0]
    assert "evaluation" not in listed["metrics"] and listed["metrics"]["val_acc"] == full["val_acc"]
    assert "evaluation" not in client.get("/v1/jobs").json()["data"][0]["metrics"]
    assert client.get(f"/v1/models/{model_id}").json()["metrics"]["evaluation"] == full["evaluation"]
    with session_scope(settings) as s:
        row = s.get(ModelRow, model_id)
        assert row is not None
        row.metrics = {k: v for k, v in old_report.items() if k != "temperature"}
    assert client.get("/v1/models").json()["data"][0]["metrics"]["temperature"] == 1.0


def test_a_damaged_stored_report_is_an_error_not_a_summary(client, settings) -> None:
    model_id = _trained_model(client, settings)
    with session_scope(settings) as s:
        row = s.get(ModelRow, model_id)
        assert row is not None
        manifest_file = settings.data_dir / row.store_key / "manifest.json"
    on_disk = json.loads(manifest_file.read_text())
    del on_disk["report"]["curves"]
    manifest_file.write_text(json.dumps(on_disk))
    with session_scope(settings) as s, pytest.raises(ValidationError, match="curves"):
        models_store.model_public(settings, s.get(ModelRow, model_id), with_report=True)
