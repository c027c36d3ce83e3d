"""The console in a real browser: chromium driven by Playwright against a real uvicorn and a real worker.

Sign in, upload a dataset, train the fast preset, watch the job finish, read the report, predict; and
a time-budgeted model's page shows its plan. Any console error or page error fails the test. With
``ZOOFIT_SCREENSHOTS=<folder>`` each page is saved there as a PNG (``docs/console`` holds the committed
ones; ``plan-card.png`` is the plan card alone).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.processes import stop_process
from service.sample_data import png_bytes
from tests.conftest import api_client, issue_key
from tests.integration.test_queue_end_to_end import start_worker
from tests.utils.data import TINY_JOB, animals, animals_zip
from tests.utils.server import serve

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# Read now: the settings fixture clears every ZOOFIT_* variable of the test's environment.
SCREENSHOTS = os.environ.get("ZOOFIT_SCREENSHOTS")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium_or_skip() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing under CI (.ci/run installs Debian's chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the console's browser test needs it")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(make_settings, tmp_path):
    """uvicorn serving the real app on a free port and a real worker (embedded SQLite broker), auth on."""
    _chromium_or_skip()
    settings = make_settings(auth_enabled="true", torch_threads="1", predict_threads="1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    key = issue_key(settings, "alice")  # creates the tables first: two processes creating them at once race
    port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    with (logs / "api.log").open("wb") as api_log, (logs / "worker.log").open("wb") as worker_log:
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            env=os.environ.copy(), stdout=api_log, stderr=subprocess.STDOUT,
        )
        worker = start_worker("console", worker_log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert api.poll() is None and time.monotonic() < deadline, (logs / "api.log").read_text()
            time.sleep(0.2)
        yield url, key, logs
    finally:
        stop_process(worker)
        stop_process(api)
        if os.environ.get("ZOOFIT_TEST_SHOW_WORKER"):
            print((logs / "worker.log").read_text(errors="replace"))


def _revoke_keys(tenant: str) -> None:
    from service.config import get_settings
    from service.db import ApiKeyRow, session_scope

    with session_scope(get_settings()) as session:
        for row in session.query(ApiKeyRow).filter_by(tenant=tenant):
            row.revoked = True


def _expected_noise(msg) -> bool:
    """Chromium logs every non-2xx fetch as a console error; these two are the console's own design."""
    url = msg.location.get("url", "") if msg.location else ""
    text = msg.text
    if "status of 401" in text and url.endswith("/v1/datasets?limit=1"):
        return True  # the sign-in probe (does this API want a key?) and the wrong key the test tries
    return "status of 422" in text and url.endswith("/v1/jobs")  # the test's deliberately wrong lr


def test_console_end_to_end(server, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, key, logs = server
    shots = SCREENSHOTS
    errors: list[str] = []

    def shot(page, name: str) -> None:
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            # Every figure and thumbnail loaded first (lazy ones load once scrolled to), not alt text.
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_function("() => Array.from(document.images).every((i) => i.complete)", timeout=20_000)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)

    archive = tmp_path / "animals.zip"
    archive.write_bytes(animals_zip(8, 3))
    _, test = animals(8, 2, 3)
    probe = tmp_path / f"{test[0][0]}.png"
    probe.write_bytes(png_bytes(test[0][2]))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        revoked: list[bool] = []  # once the key is revoked, 401s are what the test asks for
        page.on("console", lambda m: m.type == "error" and not _expected_noise(m)
                and not (revoked and "status of 401" in m.text) and errors.append(f"console: {m.text} ({m.location})"))
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.set_default_timeout(20_000)
        try:
            page.goto(url + "/")
            expect(page.get_by_test_id("signin")).to_be_visible()
            shot(page, "sign-in")
            page.fill("input[name=key]", "zf_wrong")
            page.click("button:has-text('Sign in')")
            expect(page.locator("[data-testid=signin] .error")).to_contain_text("not valid")
            page.fill("input[name=key]", key)
            page.click("button:has-text('Sign in')")
            expect(page.get_by_role("heading", name="Datasets")).to_be_visible()

            page.get_by_test_id("dataset-file").set_input_files(str(archive))
            expect(page.get_by_test_id("class-counts")).to_contain_text("bear")
            expect(page.locator(".thumbs img[src^='blob:']")).to_have_count(24)  # 8 of each of 3 classes
            shot(page, "dataset")

            page.click("text=Train a model on it")
            page.click("[data-preset=fast]")
            page.click("[data-testid=advanced] summary")
            # a 422 lands next to its field
            page.fill("input[name='optimizer.lr']", "50")
            page.click("button:has-text('Start training')")
            expect(page.locator("[data-field='optimizer.lr'] > .error")).not_to_be_empty()
            shot(page, "new-job")
            page.fill("input[name='optimizer.lr']", "0.02")
            page.fill("input[name=epochs]", "2")
            # the preset's budget plans what is left; these keep the planner's measuring and training short
            page.fill("input[name=image_size]", "64")
            page.fill("input[name='ensemble.members']", "1")
            page.click("button:has-text('Start training')")

            expect(page.get_by_test_id("job-status")).to_be_visible()
            expect(page.get_by_test_id("job-status")).to_have_text("running", timeout=60_000)
            shot(page, "job-running")
            expect(page.get_by_test_id("job-status")).to_have_text("succeeded", timeout=120_000)
            expect(page.locator("svg.chart path[d^='M']").first).to_be_attached()
            shot(page, "job-finished")

            page.get_by_test_id("model-link").click()
            expect(page.get_by_test_id("val-acc")).to_contain_text("%")
            # the API's first figure imports matplotlib: slow on 2 busy cores
            expect(page.locator(".figure img[src^='blob:']").first).to_be_attached(timeout=60_000)
            page.wait_for_load_state("networkidle")
            shot(page, "model-report")

            page.click("a.button:has-text('Try it')")
            page.get_by_test_id("predict-files").set_input_files(str(probe))
            # the API's first prediction imports torch and loads the model: slow on 2 busy cores
            expect(page.get_by_test_id("predictions").locator(".hbar").first).to_be_visible(timeout=120_000)
            expect(page.get_by_test_id("predictions")).to_contain_text("%")
            shot(page, "try-it")

            page.click("#signout")
            expect(page.get_by_test_id("signin")).to_be_visible()

            # A key revoked mid-session: the next page's 401 brings the sign-in form back (not an error card).
            page.fill("input[name=key]", key)
            page.click("button:has-text('Sign in')")
            expect(page.get_by_role("heading", name="Datasets")).to_be_visible()
            _revoke_keys("alice")
            revoked.append(True)
            page.click("#nav a[href='#/models']")
            expect(page.get_by_test_id("signin")).to_be_visible()
            page.wait_for_timeout(300)
            expect(page.get_by_test_id("signin")).to_be_visible()
            expect(page.get_by_text("Something went wrong")).to_have_count(0)
        except Exception:
            shot(page, "failure")
            print("\n".join(errors))
            print((logs / "api.log").read_text(errors="replace")[-3000:])
            print((logs / "worker.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            browser.close()
    assert not errors, "\n".join(errors)


@pytest.fixture
def planned_models(make_settings, monkeypatch):
    """A live API (uvicorn in a thread of the test) holding two models trained in-process: one with a time
    budget (its report has a plan and a learning-rate range test), one without. (url, key, settings, ids)."""
    import torch

    from service.api.deps import get_enqueue
    from service.app import create_app
    from service.config import get_settings
    from service.db import JobStatus
    from workers.jobs import run_job

    _chromium_or_skip()
    torch.set_num_threads(1)
    settings = make_settings(torch_threads="1", predict_threads="1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids = {}
    with api_client(settings, "alice", enqueue=lambda _job_id: None) as client:
        ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(6, 3), "application/zip")})
        assert ds.status_code == 201, ds.text
        # The tiny network (kept): the planner measures it, plans the rest for 8 s and trains with lr 'auto'.
        for name, job in (("plan", {"backbone": "test_efficientnet", "weights": "none", "budget_s": 8}),
                          ("plain", TINY_JOB)):
            r = client.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **job})
            assert r.status_code == 202, r.text
            assert run_job(r.json()["id"], settings=settings) == JobStatus.SUCCEEDED
            ids[name] = client.get(f"/v1/jobs/{r.json()['id']}").json()["model_id"]
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_enqueue] = lambda: lambda _job_id: None
    with serve(app) as url:
        yield url, issue_key(settings, "alice"), settings, ids


def _manifest_file(settings, model_id: str) -> Path:
    from service.db import ModelRow, session_scope

    with session_scope(settings) as s:
        row = s.get(ModelRow, model_id)
        assert row is not None
        return Path(settings.data_dir / row.store_key / "manifest.json")  # the report's one stored copy


def _add_plan_notes(settings, model_id: str) -> dict:
    """Give the model's stored plan a default budget, a deadline, a shortened and a skipped member (as a tight
    budget would)."""
    manifest_file = _manifest_file(settings, model_id)
    manifest = json.loads(manifest_file.read_text())
    notes = {
        "deadline": {"member": 1, "epoch": 3, "note": "stopped in member 2, epoch 4; every member trained so far "
                     "is kept with its best weights"},
        "members_skipped": {"planned": 3, "trained": 2, "member_s": 4.2, "left_s": 1.0,
                            "note": "member 3 of 3 not started: a member takes about 4 s and 1 s were left before "
                            "the deadline"},
        "members_shortened": {"members": [{"member": 1, "epochs": 3}], "planned_epochs": 6,
                              "note": "member 2 of 3 trains 3 of 6 epochs (a shorter schedule): a whole member "
                              "takes about 8 s and 5 s were left before the deadline"},
    }
    manifest["report"]["plan"].update(default_budget=True, **notes)
    manifest_file.write_text(json.dumps(manifest))
    return notes


def test_model_page_shows_the_plan(planned_models) -> None:
    from playwright.sync_api import expect, sync_playwright

    from models.report import Plan

    url, key, settings, ids = planned_models
    report = httpx.get(f"{url}/v1/models/{ids['plan']}/report", headers={"Authorization": f"Bearer {key}"}).json()
    plan = Plan.model_validate(report["plan"])
    assert plan.why and plan.throughputs and "image_size" in plan.planned and report["lr_finder"]
    errors: list[str] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: m.type == "error" and not _expected_noise(m)
                and errors.append(f"console: {m.text} ({m.location})"))
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.set_default_timeout(20_000)
        try:
            page.goto(url + "/")
            page.fill("input[name=key]", key)
            page.click("button:has-text('Sign in')")
            expect(page.get_by_role("heading", name="Datasets")).to_be_visible()

            # A model trained without a budget: no plan card (and no lr finder: its lr was set).
            page.goto(f"{url}/#/models/{ids['plain']}")
            expect(page.get_by_test_id("val-acc")).to_contain_text("%")
            expect(page.get_by_role("heading", name="Per class")).to_be_visible()
            expect(page.get_by_test_id("plan")).to_have_count(0)
            expect(page.get_by_test_id("lr-finder")).to_have_count(0)

            page.goto(f"{url}/#/models/{ids['plan']}")
            card = page.get_by_test_id("plan")
            expect(card).to_be_visible()
            expect(card.get_by_test_id("plan-why").locator("li")).to_have_text(plan.why)
            expect(card.locator("[data-testid=plan-fields] tr[data-field=image_size] td").nth(1)).to_have_text(
                f"{plan.planned['image_size']} px")
            expect(card.locator("[data-testid=plan-fields] tr[data-field=backbone]")).to_contain_text(
                "test_efficientnet you set")  # kept: the job set it
            expect(card.get_by_test_id("plan-budget")).to_have_text("8.0 s")
            rows = card.locator("[data-testid=plan-throughputs] tbody tr")
            expect(rows).to_have_count(len(plan.throughputs))
            expect(rows.first).to_contain_text(f"{plan.throughputs[0].size} px")
            # the row the plan trains stands out
            expect(card.locator("[data-testid=plan-throughputs] tr.chosen")).to_contain_text(
                f"{plan.planned['image_size']} px")
            picked = float(card.get_by_test_id("lr-picked").inner_text())
            assert picked == pytest.approx(report["lr_finder"]["lr"], rel=0.05)
            expect(card.locator("[data-testid=lr-finder] .figure img[src^='blob:']")).to_be_attached(timeout=60_000)
            expect(card.get_by_test_id("plan-deadline")).to_have_count(0)

            # Where the deadline cut training and members were skipped, the card says so.
            notes = _add_plan_notes(settings, ids["plan"])
            page.reload()
            expect(card.get_by_test_id("plan-deadline")).to_contain_text(notes["deadline"]["note"])
            expect(card.get_by_test_id("plan-members-skipped")).to_contain_text(notes["members_skipped"]["note"])
            expect(card.get_by_test_id("plan-members-shortened")).to_contain_text(notes["members_shortened"]["note"])
            expect(card.get_by_test_id("plan-budget")).to_contain_text("the default budget for this device")
            expect(card.locator("[data-testid=lr-finder] .figure img[src^='blob:']")).to_be_attached(timeout=60_000)
            page.wait_for_load_state("networkidle")
            if SCREENSHOTS:
                Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
                card.screenshot(path=str(Path(SCREENSHOTS) / "plan-card.png"))

            # lr 'auto' without a budget: no plan, the range test in a card of its own.
            manifest_file = _manifest_file(settings, ids["plan"])
            manifest = json.loads(manifest_file.read_text())
            del manifest["report"]["plan"]
            manifest_file.write_text(json.dumps(manifest))
            page.reload()
            expect(page.get_by_test_id("lr-finder-card").locator(".figure img[src^='blob:']")).to_be_attached()
            expect(page.get_by_test_id("plan")).to_have_count(0)
        except Exception:
            if SCREENSHOTS:
                page.screenshot(path=str(Path(SCREENSHOTS) / "plan-failure.png"), full_page=True)
            print("\n".join(errors))
            raise
        finally:
            browser.close()
    assert not errors, "\n".join(errors)


def test_console_is_served_with_its_headers(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "<title>zoofit</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["cache-control"] == "no-cache"
    js = client.get("/console/js/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["cache-control"].startswith("public, max-age=")
    assert client.get("/console/console.css").status_code == 200
    assert client.get("/console/__init__.py").status_code == 404  # only the console's assets
    assert client.get("/console/../service/app.py").status_code == 404
