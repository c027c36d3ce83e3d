"""GET /metrics: the figures move by what happened (a job trained in-process, two predictions),
per route template, without the API key and without counting the scrape; and a worker's metrics
survive its forked pool processes (multiprocess mode)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.db import JobStatus
from service.sample_data import png_bytes
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals, animals_zip
from workers.jobs import run_job

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _scrape(client) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return _parse(r.text)


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_by_a_job_and_two_predictions(client, settings) -> None:
    before = _scrape(client)
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(6, 3), "application/zip")})
    assert ds.status_code == 201, ds.text
    job = client.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **TINY_JOB, "ensemble": {"members": 1}})
    assert job.status_code == 202, job.text
    queued = _scrape(client)
    assert _get(queued, "zoofit_jobs", status="queued") == 1 and _get(queued, "zoofit_jobs", status="succeeded") == 0
    assert run_job(job.json()["id"], settings=settings) == JobStatus.SUCCEEDED
    model_id = client.get(f"/v1/jobs/{job.json()['id']}").json()["model_id"]

    _, test = animals(6, 2, 3)
    files = [("files", (f"{n}-{i}.png", png_bytes(img), "image/png")) for n, i, img in test[:3]]
    for _ in range(2):
        r = client.post(f"/v1/models/{model_id}/predict", files=files, params={"tta": "none"})
        assert r.status_code == 200, r.text
    after = _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    # jobs by status: counted at scrape time
    assert _get(after, "zoofit_jobs", status="succeeded") == 1
    assert _get(after, "zoofit_jobs", status="queued") == _get(after, "zoofit_jobs", status="running") == 0
    # the worker's figures (in-process here: run_job ran in this process)
    epochs = TINY_JOB["epochs"]
    assert delta("zoofit_job_queue_wait_seconds_count") == 1 and delta("zoofit_job_queue_wait_seconds_sum") > 0
    assert delta("zoofit_job_duration_seconds_count", status="succeeded") == 1
    assert delta("zoofit_job_duration_seconds_sum", status="succeeded") > 0
    assert delta("zoofit_epochs_total") == epochs
    assert delta("zoofit_epoch_duration_seconds_count") == epochs and delta("zoofit_epoch_duration_seconds_sum") > 0
    assert delta("zoofit_train_images_per_second_count") == epochs
    assert delta("zoofit_train_images_per_second_sum") > 0
    # prediction: one forward pass of 3 images per request; the model loaded once, then found
    assert delta("zoofit_predict_batch_images_count") == 2 and delta("zoofit_predict_batch_images_sum") == 6
    assert delta("zoofit_predict_batch_images_bucket", le="2.0") == 0
    assert delta("zoofit_predict_batch_images_bucket", le="4.0") == 2
    assert delta("zoofit_predict_batch_seconds_count") == 2
    assert delta("zoofit_model_cache_misses_total") == 1 and delta("zoofit_model_cache_hits_total") == 1
    # HTTP: per route template, never a raw id
    predict = {"handler": "/v1/models/{model_id}/predict", "method": "POST"}
    assert delta("http_requests_total", status="2xx", **predict) == 2
    assert delta("http_request_duration_seconds_count", **predict) == 2
    assert delta("http_requests_total", handler="/v1/jobs/{job_id}", method="GET", status="2xx") == 1
    handlers = {dict(labels).get("handler") for _, labels in after}
    assert model_id not in str(handlers) and job.json()["id"] not in str(handlers)
    # the scrapes are not counted
    assert "/metrics" not in handlers


def test_metrics_need_no_api_key_unless_a_token_is_set(make_settings) -> None:
    settings = make_settings()
    with api_client(settings, tenant=None) as anonymous:
        assert anonymous.get("/v1/jobs").status_code == 401
        for _ in range(3):
            samples = _scrape(anonymous)
        assert _get(samples, "zoofit_jobs", status="queued") == 0
        assert not any(dict(labels).get("handler") == "/metrics" for _, labels in samples)
        assert _get(samples, "http_requests_total", handler="/v1/jobs", method="GET", status="4xx") == 1
        assert "/metrics" not in anonymous.get("/openapi.json").json()["paths"]

    settings = make_settings(metrics_token="scrape-s3cret")
    with api_client(settings, tenant=None) as anonymous:
        r = anonymous.get("/metrics")
        assert r.status_code == 401 and "ZOOFIT_METRICS_TOKEN" in r.json()["detail"]
        assert anonymous.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = anonymous.get("/metrics", headers={"Authorization": "Bearer scrape-s3cret"})
        assert r.status_code == 200 and "zoofit_jobs" in r.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_worker_exports_what_its_forked_pool_processes_observed(tmp_path) -> None:
    # As a prefork worker: the main process serves, forked children observe (they have exited by the scrape).
    port = _free_port()
    script = textwrap.dedent(f"""
        import multiprocessing, sys, time
        from service.config import Settings
        from workers import metrics

        directory = metrics.serve_worker_metrics(Settings(data_dir={str(tmp_path)!r}, worker_metrics_port={port}))
        print(directory, flush=True)

        def task(i):
            metrics.observe_epoch(0.5 + i, 100.0)
            metrics.worker_metrics().job_duration.labels(status="succeeded").observe(3.0)

        ctx = multiprocessing.get_context("fork")
        for i in range(2):
            p = ctx.Process(target=task, args=(i,))
            p.start()
            p.join()
            metrics.pool_process_exited(p.pid)
        print("ready", flush=True)
        sys.stdin.read()  # until the test is done scraping
        metrics.stop_worker_metrics(directory)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        directory = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        samples = _parse(text)
        assert _get(samples, "zoofit_epochs_total") == 2
        assert _get(samples, "zoofit_epoch_duration_seconds_count") == 2
        assert _get(samples, "zoofit_epoch_duration_seconds_sum") == pytest.approx(2.0)
        assert _get(samples, "zoofit_train_images_per_second_count") == 2
        assert _get(samples, "zoofit_job_duration_seconds_count", status="succeeded") == 2
        names = Counter(name for name, _ in samples)
        assert names["zoofit_epochs_total"] == 1  # summed over the processes, not one series each
    finally:
        proc.communicate("", timeout=30)
    assert proc.returncode == 0
    assert directory.startswith("/") and not __import__("os").path.exists(directory)
