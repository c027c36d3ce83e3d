"""PostgreSQL restarted under a running API and worker: 503s during the outage, nothing lost after.

The test stops and starts the local PostgreSQL server itself (``pg_ctlcluster``), so it runs
only where that server is this machine's (CI and the developer machines); anything else on the
machine that uses PostgreSQL sees the same few seconds of outage.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.test_queue_end_to_end import stack, submit, wait_status  # noqa: F401
from tests.utils.data import TINY_JOB

pytestmark = pytest.mark.integration


def _cluster() -> list[str]:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").is_dir() else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        pytest.skip("no local PostgreSQL cluster to restart (pg_ctlcluster)")
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


def _ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], check=False).returncode == 0


@contextmanager
def postgres_down() -> Iterator[None]:
    """PostgreSQL stopped for the duration of the block, started again whatever happens."""
    cluster = _cluster()
    subprocess.run([*cluster, "stop", "-m", "fast"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([*cluster, "start"], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while not _ready():
            assert time.monotonic() < deadline, "PostgreSQL did not come back"
            time.sleep(0.5)


def test_postgres_restart_under_a_running_job(stack) -> None:  # noqa: F811
    client, settings, _worker = stack
    job = submit(client, {**TINY_JOB, "epochs": 8})
    running = wait_status(client, job["id"], {"running", "succeeded"})
    assert running["status"] == "running"
    with postgres_down():
        time.sleep(1)
        for method, path in (("get", "/v1/jobs"), ("get", f"/v1/jobs/{job['id']}"), ("post", "/v1/datasets")):
            r = getattr(client, method)(path)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert "database is unavailable" in r.json()["detail"] and "127.0.0.1" not in r.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"].startswith("error")
        time.sleep(2 * settings.worker_heartbeat_s)  # the worker's writes fail for a while
    # Both recover without a restart: the API answers, the job finishes, its model predicts.
    assert client.get("/readyz").status_code == 200
    done = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    epochs = [(r["member"], r["epoch"]) for r in done["history"]]
    assert epochs == sorted(set(epochs)) and len(epochs) == done["spec"]["epochs"]  # one run, no gap
    assert client.get(f"/v1/models/{done['model_id']}").status_code == 200
