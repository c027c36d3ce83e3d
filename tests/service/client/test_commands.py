"""The ``zoofit`` client subcommands against the real API, served over HTTP in a thread of the test."""

from __future__ import annotations

import io
import json
import re
import stat
import zipfile

import pytest

from service import cli
from service.client.credentials import credentials_path
from service.db import JobStatus
from service.presets import PRESETS
from service.sample_data import png_bytes
from tests.conftest import issue_key
from tests.utils.data import TINY_JOB, animals, animals_zip
from tests.utils.server import serve


@pytest.fixture
def api(make_settings, enqueued, monkeypatch, tmp_path, request):
    """(url, key, settings) of a live API; the CLI finds both in ZOOFIT_URL / ZOOFIT_API_KEY.

    Parametrize it indirectly with a dict of further settings.
    """
    from service.api.deps import get_enqueue, get_enqueue_export
    from service.app import create_app
    from service.config import get_settings

    settings = make_settings(torch_threads="1", predict_threads="1", **getattr(request, "param", {}))
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_enqueue] = lambda: enqueued.append
    app.dependency_overrides[get_enqueue_export] = lambda: _export_worker(settings)
    key = issue_key(settings, "alice")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with serve(app) as url:
        monkeypatch.setenv("ZOOFIT_URL", url)
        monkeypatch.setenv("ZOOFIT_API_KEY", key)
        yield url, key, settings


def _export_worker(settings):
    """What a worker does with a queued export: build it (here in a thread of the test)."""
    import threading

    from workers.exports import run_export

    def send(export_id: str) -> None:
        threading.Thread(target=run_export, args=(export_id,), kwargs={"settings": settings}, daemon=True).start()

    return send


def zoofit(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``zoofit argv``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write_folder(root, per_class: int = 4):
    folder = root / "animals"
    for name, i, image in animals(per_class, 2, 3)[0]:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{i}.png").write_bytes(png_bytes(image))
    (folder / ".DS_Store").write_bytes(b"\0junk")  # hidden: left out of the zip
    return folder


def test_folder_is_zipped_on_the_fly_and_the_api_lists_its_counts(api, capsys, tmp_path):
    folder = write_folder(tmp_path, per_class=4)
    code, out, err = zoofit(capsys, "datasets", "upload", str(folder), "--json")
    assert code == 0, err
    ds = json.loads(out)
    assert ds["counts"] == {"bear": 4, "bird": 4, "cat": 4} and ds["skipped"] == []
    code, out, _ = zoofit(capsys, "datasets", "ls", "--json")
    listed = json.loads(out)
    assert listed["count"] == 1 and listed["data"][0]["id"] == ds["id"]
    assert listed["data"][0]["num_images"] == 12
    code, out, _ = zoofit(capsys, "datasets", "ls")
    assert code == 0 and ds["id"] in out and "1 datasets" in out


def test_an_archive_uploads_as_it_is(api, capsys, tmp_path):
    archive = tmp_path / "pets.zip"
    archive.write_bytes(animals_zip(per_class=3, classes=2))
    code, out, err = zoofit(capsys, "datasets", "upload", str(archive), "--name", "pets", "--json")
    assert code == 0, err
    ds = json.loads(out)
    assert ds["name"] == "pets" and ds["num_images"] == 6


def test_submit_with_the_fast_preset_creates_its_job(api, capsys, tmp_path, enqueued):
    _url, _key, _settings = api
    code, out, err = zoofit(capsys, "datasets", "upload", str(write_folder(tmp_path, 3)), "--json")
    ds_id = json.loads(out)["id"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("patience: 2\nseed: 5\n")
    code, out, err = zoofit(capsys, "jobs", "submit", "--preset", "fast", "-f", str(recipe), "--dataset", ds_id,
                            "--set", "epochs=2", "--set", "optimizer.lr=0.005", "--json")
    assert code == 0, err
    job = json.loads(out)
    fast = PRESETS["fast"].job
    spec = job["spec"]
    assert job["dataset_id"] == ds_id and enqueued == [job["id"]]
    assert spec["budget_s"] == fast["budget_s"] and spec["optimizer"]["lr"] == 0.005
    assert spec["epochs"] == 2 and spec["patience"] == 2 and spec["seed"] == 5
    assert {"epochs", "optimizer.lr", "patience"} <= set(spec["keep"])  # the planner leaves them be

    code, out, _ = zoofit(capsys, "jobs", "ls", "--json")
    assert [j["id"] for j in json.loads(out)["data"]] == [job["id"]]
    code, out, _ = zoofit(capsys, "jobs", "show", job["id"], "--json")
    assert json.loads(out)["status"] == "queued"
    code, out, _ = zoofit(capsys, "jobs", "cancel", job["id"])
    assert code == 0 and f"job {job['id']}: cancelled" in out
    code, out, _ = zoofit(capsys, "presets", "--json")
    assert [p["name"] for p in json.loads(out)["data"]] == list(PRESETS)


def test_an_api_error_prints_its_one_line_message_and_exits_non_zero(api, capsys):
    code, out, err = zoofit(capsys, "jobs", "show", "no-such-job")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("zoofit: ") and "no-such-job" in err
    # a validation error (422): still one line
    code, out, err = zoofit(capsys, "jobs", "submit", "--dataset", "x", "--set", "epochs=-1")
    assert code == 1 and out == "" and err.count("\n") == 1 and "epochs" in err
    code, out, err = zoofit(capsys, "jobs", "submit", "--preset", "fastest", "--dataset", "x")
    assert code == 1 and "fast, balanced, best" in err


@pytest.mark.parametrize("api", [{"tenant_max_queued_jobs": "1"}], indirect=True)
def test_a_refusal_to_retry_later_says_when(api, capsys, tmp_path):
    """A 429 (here: the queued-jobs limit) prints the API's message and its Retry-After."""
    from service.quotas import QUEUE_RETRY_AFTER_S

    code, out, err = zoofit(capsys, "datasets", "upload", str(write_folder(tmp_path, 3)), "--json")
    ds_id = json.loads(out)["id"]
    code, out, err = zoofit(capsys, "jobs", "submit", "--dataset", ds_id, "--set", "epochs=1")
    assert code == 0, err
    code, out, err = zoofit(capsys, "jobs", "submit", "--dataset", ds_id, "--set", "epochs=1")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "already has 1 queued jobs" in err, err
    assert err.rstrip().endswith(f"(the API asks to retry after {QUEUE_RETRY_AFTER_S} s)"), err


def test_login_checks_the_key_and_stores_it(api, capsys, monkeypatch):
    url, key, _settings = api
    monkeypatch.delenv("ZOOFIT_URL")
    monkeypatch.delenv("ZOOFIT_API_KEY")
    monkeypatch.setattr("sys.stdin", io.StringIO("zf_wrong_key\n"))
    code, _out, err = zoofit(capsys, "login", url)
    assert code == 1 and err.startswith("zoofit: ") and not credentials_path().exists()
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    code, _out, err = zoofit(capsys, "login", url)
    assert code == 0, err
    path = credentials_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"current": url, "keys": {url: key}}
    code, out, err = zoofit(capsys, "models", "ls", "--json")  # the stored login, no environment
    assert code == 0, err
    assert json.loads(out) == {"data": [], "count": 0}


def _model_trained_through_the_cli(api, capsys, tmp_path, recipe: dict | None = None) -> str:
    """Upload, submit a tiny recipe from a file, train it (in process), return the model id the CLI shows."""
    from workers.jobs import run_job

    _url, _key, settings = api
    archive = tmp_path / "a.zip"
    archive.write_bytes(animals_zip(6, 3))
    ds_id = json.loads(zoofit(capsys, "datasets", "upload", str(archive), "--json")[1])["id"]
    recipe_file = tmp_path / "tiny.json"
    recipe_file.write_text(json.dumps({**(TINY_JOB if recipe is None else recipe), "dataset_id": ds_id}))
    job = json.loads(zoofit(capsys, "jobs", "submit", "-f", str(recipe_file), "--json")[1])
    assert run_job(job["id"], settings=settings) == JobStatus.SUCCEEDED
    return str(json.loads(zoofit(capsys, "jobs", "show", job["id"], "--json")[1])["model_id"])


def test_report_figures_and_predict(api, capsys, tmp_path):
    model_id = _model_trained_through_the_cli(api, capsys, tmp_path)

    code, out, err = zoofit(capsys, "models", "report", model_id, "--save-figures", str(tmp_path / "figs"))
    assert code == 0, err
    for name in ("bear", "bird", "cat", "precision", "recall", "f1", "support", "macro avg"):
        assert name in out
    assert "time budget" not in out  # no budget, no plan
    for name in ("curves", "confusion", "reliability"):
        assert (tmp_path / "figs" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "figs" / "lr_finder.png").exists()  # its lr was set: no range test
    report = json.loads(zoofit(capsys, "models", "report", model_id, "--json")[1])
    assert [c["label"] for c in report["evaluation"]["per_class"]] == ["bear", "bird", "cat"]

    images = []
    for name, i, image in animals(6, 2, 3)[1][:2]:
        images.append(tmp_path / f"{name}-{i}.png")
        images[-1].write_bytes(png_bytes(image))
    code, out, err = zoofit(capsys, "models", "predict", model_id, *map(str, images), "--top-k", "2",
                            "--tta", "hflip", "--json")
    assert code == 0, err
    body = json.loads(out)
    assert [p["file"] for p in body["predictions"]] == [p.name for p in images]
    assert all(len(p["top_k"]) == 2 for p in body["predictions"])
    code, out, _ = zoofit(capsys, "models", "predict", model_id, str(images[0]), "--top-k", "3")
    assert code == 0 and images[0].name in out and "probability" in out


def test_a_budgeted_model_shows_its_plan(api, capsys, tmp_path):
    # The tiny network (kept); the planner measures it and plans the rest for 8 s, with lr 'auto'.
    model_id = _model_trained_through_the_cli(
        api, capsys, tmp_path, {"backbone": "test_efficientnet", "weights": "none", "budget_s": 8})
    report = json.loads(zoofit(capsys, "models", "report", model_id, "--json")[1])
    plan = report["plan"]
    assert plan["why"] and report["lr_finder"]

    code, out, err = zoofit(capsys, "models", "report", model_id, "--save-figures", str(tmp_path / "figs"))
    assert code == 0, err
    assert "plan for the time budget of 8.0 s" in out and "precision" in out
    assert re.search(rf"planned image_size\s*│\s*{plan['planned']['image_size']}\s", out), out
    assert "you set" in out and "backbone, weights" in out
    assert f"{report['lr_finder']['lr']:.2g}" in out
    for line in plan["why"]:
        assert line[:40] in out, (line, out)
    assert "estimated" in out and "took" in out
    assert (tmp_path / "figs" / "lr_finder.png").read_bytes().startswith(b"\x89PNG")
    # the model and its job show the plan too (their metrics are the report)
    job_id = json.loads(zoofit(capsys, "models", "show", model_id, "--json")[1])["job_id"]
    for argv in (("models", "show", model_id), ("jobs", "show", job_id)):
        code, out, err = zoofit(capsys, *argv)
        assert code == 0 and "plan for the time budget of 8.0 s" in out and plan["why"][0][:40] in out, (argv, out, err)


def test_zip_folder_streams_in_chunks(tmp_path):
    from service.client.uploads import CHUNK, zip_folder

    folder = tmp_path / "big"
    (folder / "a").mkdir(parents=True)
    blobs = {f"a/{i}.bin": bytes([i]) * (CHUNK * 2 + 17) for i in range(3)}
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    chunks = list(zip_folder(folder))
    assert len(chunks) > 6 and max(map(len, chunks)) <= CHUNK + 1024  # never a whole file at once
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as zf:
        assert {n: zf.read(n) for n in zf.namelist()} == {f"big/{n}": d for n, d in blobs.items()}


def test_models_export_waits_for_the_build_and_downloads_the_bundle(api, capsys, tmp_path):
    model_id = _model_trained_through_the_cli(api, capsys, tmp_path)

    code, out, err = zoofit(capsys, "models", "export", model_id, "--format", "onnx", "-o", str(tmp_path / "out"),
                            "--poll", "0.2")
    assert code == 0, err
    path = tmp_path / "out" / f"zoofit-{model_id}-onnx.zip"
    assert out.strip() == str(path) and "top-1 agreement 100%" in err
    names = set(zipfile.ZipFile(path).namelist())
    assert names == {"model.onnx", "labels.json", "preprocess.json", "README.md", "SHA256SUMS"}
    code, _out, err = zoofit(capsys, "models", "export", "nope", "--format", "onnx", "-o", str(tmp_path))
    assert code == 1 and "not found" in err
