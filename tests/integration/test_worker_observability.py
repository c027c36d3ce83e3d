"""A real prefork worker (Redis, PostgreSQL) exports what its pool process observed on its metrics
port, and its JSON log lines of a job carry the job's id and tenant."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from service.processes import stop_process
from tests.conftest import api_client
from tests.integration import test_queue_end_to_end as e2e
from tests.service.test_metrics import _get, _parse
from tests.utils.data import TINY_JOB

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_prefork_worker_exports_its_job_metrics_and_logs_the_job_id(make_settings, pg_url, redis_url, tmp_path):
    port = _free_port()
    settings = make_settings(database_url=pg_url, broker_url=redis_url, worker_metrics_port=str(port),
                             log_format="json")
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        worker = e2e.start_worker("obs", log_file)
    try:
        with api_client(settings) as client:
            job = e2e.submit(client, {**TINY_JOB, "ensemble": {"members": 1}})
            assert e2e.wait_status(client, job["id"], {"succeeded", "failed"})["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while True:  # the pool process records the outcome just after the database does
            samples = _parse(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
            if _get(samples, "zoofit_job_duration_seconds_count", status="succeeded") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert _get(samples, "zoofit_job_duration_seconds_count", status="succeeded") == 1
        assert _get(samples, "zoofit_job_queue_wait_seconds_count") == 1
        assert _get(samples, "zoofit_epochs_total") == TINY_JOB["epochs"]
        assert _get(samples, "zoofit_train_images_per_second_count") == TINY_JOB["epochs"]
    finally:
        stop_process(worker)
    lines = []
    for raw in log_path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # Celery's own banner is not a log record
    of_job = [x for x in lines if x.get("job_id") == job["id"]]
    assert of_job, log_path.read_text(errors="replace")[-3000:]
    assert any("succeeded" in x["message"] and x.get("tenant") == "alice" for x in of_job)
