"""Real parts: a Celery worker process, Redis as broker, PostgreSQL as the store."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from models.checkpoint import has_state
from service.processes import stop_process
from service.sample_data import png_bytes
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals, animals_zip
from tests.utils.events import stream_events
from tests.utils.workers import log_tail, start_worker, wait_status
from workers.jobs import checkpoint_dir

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(make_settings, pg_url, redis_url, monkeypatch, request, tmp_path):
    """API in-process with the real enqueue, a real worker process, Redis and PostgreSQL.

    Parametrize it indirectly with a dict of further settings.
    """
    extra = getattr(request, "param", {})
    settings = make_settings(database_url=pg_url, broker_url=redis_url, worker_heartbeat_s="5", **extra)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail hub downloads fast, as an air-gapped deployment would
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        worker = start_worker("test", log_file)
    try:
        with api_client(settings) as client:
            yield client, settings, worker
    finally:
        stop_process(worker)
        if os.environ.get("ZOOFIT_TEST_SHOW_WORKER"):
            print(log_path.read_text(errors="replace"))


def submit(client, job: dict, per_class: int = 6) -> dict:
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(per_class, 3), "application/zip")})
    assert ds.status_code == 201, ds.text
    r = client.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **job})
    assert r.status_code == 202, r.text
    return r.json()


def test_job_runs_on_real_worker_then_predicts(stack):
    client, settings, worker = stack
    assert settings.resolved_database_url.startswith("postgresql")
    ready = client.get("/readyz").json()
    assert ready == {"status": "ok", "database": "ok", "broker": "ok"}

    job = submit(client, {**TINY_JOB, "epochs": 3})
    seen = {wait_status(client, job["id"], {"running", "succeeded"})["status"]}
    j = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    seen.add(j["status"])
    assert j["status"] == "succeeded", j["error"]
    assert len(j["history"]) == 3 and j["attempts"] == 1
    events = stream_events(client, job["id"])  # written by the worker process, on PostgreSQL
    assert [d["epoch"] for _, t, d in events if t == "epoch"] == [1, 2, 3]
    kind, done = events[-1][1:]
    assert kind == "done" and done["status"] == "succeeded" and done["model_id"] == j["model_id"]
    assert done["error"] is None and done["metrics"]["val_acc"] == j["metrics"]["val_acc"]

    _, test = animals(6, 2, 3)
    files = [("files", (f"{n}.png", png_bytes(img), "image/png")) for n, _, img in test]
    r = client.post(f"/v1/models/{j['model_id']}/predict", files=files)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == len(test)
    assert worker.poll() is None


def test_running_job_cancelled_through_api(stack):
    client, _, _ = stack
    job = submit(client, {**TINY_JOB, "epochs": 300})
    j = wait_status(client, job["id"], {"running"})
    deadline = time.monotonic() + 60
    while not j["history"]:  # let it train at least one epoch
        assert time.monotonic() < deadline
        time.sleep(0.2)
        j = client.get(f"/v1/jobs/{job['id']}").json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    j = wait_status(client, job["id"], {"cancelled", "succeeded", "failed"}, timeout=60)
    assert j["status"] == "cancelled" and len(j["history"]) < 300


@pytest.mark.parametrize("stack", [{"tenant_max_running_jobs": "1"}], indirect=True)
def test_one_tenants_backlog_does_not_starve_another_on_a_real_worker(stack):
    """A: 3 jobs, then B: 1, one slot each: the worker runs A1, B1, A2, A3 (first come: A1, A2, A3, B1)."""
    client, settings, _ = stack
    from tests.conftest import issue_key

    a_jobs = [submit(client, TINY_JOB)["id"] for _ in range(3)]
    b_key = {"Authorization": f"Bearer {issue_key(settings, 'tenant-b')}"}
    ds = client.post("/v1/datasets", headers=b_key,
                     files={"file": ("a.zip", animals_zip(6, 3), "application/zip")}).json()
    b_job = client.post("/v1/jobs", headers=b_key, json={"dataset_id": ds["id"], **TINY_JOB}).json()["id"]
    done = {j: wait_status(client, j, {"succeeded", "failed"}) for j in a_jobs}
    b = client.get(f"/v1/jobs/{b_job}", headers=b_key).json()
    assert b["status"] == "succeeded" and all(j["status"] == "succeeded" for j in done.values())
    order = sorted([*a_jobs, b_job], key=lambda j: (b if j == b_job else done[j])["started_at"])
    assert order == [a_jobs[0], b_job, *a_jobs[1:]]


def test_failing_job_records_error(stack):
    client, settings, _ = stack
    # hub weights cannot be downloaded here: the job fails with a clear error, the worker lives on
    job = submit(client, {**TINY_JOB, "backbone": "resnet18", "weights": "hub"})
    j = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert j["status"] == "failed"
    assert "tf_efficientnet_lite0" in j["error"]  # names the bundled alternative
    ok = submit(client, TINY_JOB)
    assert wait_status(client, ok["id"], {"succeeded", "failed"})["status"] == "succeeded"


@pytest.mark.parametrize(
    "stack", [{"device": "cpu", "tenant_max_running_jobs": "3", "requeue_after_s": "1"}], indirect=True
)
def test_a_cpu_worker_takes_cpu_and_any_jobs_and_leaves_a_cuda_job_queued(stack):
    """A CPU host's worker (its computed queues: train, train-cpu, export) runs a cpu job and an any
    job; the cuda job, sent first, stays queued for a GPU host with its one message in train-cuda:
    the reconciler (a pass a second here) counts that queue's messages and never re-sends it."""
    from service.queue import TRAIN_CUDA_QUEUE, broker_backlog

    client, _, worker = stack
    cuda = submit(client, {**TINY_JOB, "device": "cuda"})["id"]
    others = [submit(client, {**TINY_JOB, "device": device})["id"] for device in ("cpu", "any")]
    for job_id in others:
        j = wait_status(client, job_id, {"succeeded", "failed", "cancelled"})
        assert j["status"] == "succeeded", j["error"]
    time.sleep(3)  # a few more reconciler passes
    j = client.get(f"/v1/jobs/{cuda}").json()
    assert (j["status"], j["attempts"], j["started_at"], j["progress"]["stage"]) == ("queued", 0, None, "queued")
    assert broker_backlog(TRAIN_CUDA_QUEUE) == 1
    assert worker.poll() is None


def test_worker_killed_mid_job_another_finishes_it(make_settings, pg_url, redis_url, monkeypatch):
    """SIGKILL the worker while it trains: a new worker resumes the job from its last epoch checkpoint."""
    settings = make_settings(database_url=pg_url, broker_url=redis_url, worker_heartbeat_s="1")

    first = start_worker("first", new_session=True)
    second = None
    try:
        with api_client(settings) as client:
            job = submit(client, {**TINY_JOB, "epochs": 30})
            ckpt = checkpoint_dir(settings, job["id"])
            j = wait_status(client, job["id"], {"running"})
            # A third epoch on record means the second one's checkpoint is on disk.
            while len(j["history"]) < 3 or not has_state(ckpt):
                assert j["status"] == "running", j
                time.sleep(0.1)
                j = client.get(f"/v1/jobs/{job['id']}").json()
            before = j["history"]
            os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool child die at once
            first.wait(10)
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
            second = start_worker("second", new_session=True)
            j = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
            assert j["status"] == "succeeded", j["error"]
            assert j["attempts"] == 2
            assert [h["epoch"] for h in j["history"]] == list(range(30))  # one clean run, not two
            # ...that the second worker continued: it took over after the checkpointed epoch...
            resumed = j["progress"]["resumed_from"]
            assert resumed["member"] == 1 and 2 <= resumed["epoch"] < 30, resumed
            # ...and the epochs before it are the first worker's records, untouched.
            kept = min(resumed["epoch"], len(before))
            assert j["history"][:kept] == before[:kept]
            # The stream tells the same story: a second attempt resumed where the history says.
            events = stream_events(client, job["id"])
            assert [d["attempt"] for _, t, d in events if t == "status" and d["status"] == "running"] == [1, 2]
            last = max(i for i, (_, t, _) in enumerate(events) if t == "restart")
            restart = events[last][2]
            assert restart["attempt"] == 2 and restart["resumed_from"] == resumed
            after = [d for _, t, d in events[last:] if t == "epoch"]
            assert len(restart["history"]) + len(after) == 30 and after[-1]["epoch"] == 30
            assert events[-1][1] == "done" and events[-1][2]["model_id"] == j["model_id"]
            assert not ckpt.exists()
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def test_job_survives_redis_losing_its_message(make_settings, pg_url, redis_url, monkeypatch):
    """Redis keeps nothing on disk: flush it after submitting; the reconciler re-sends the job."""
    import redis

    settings = make_settings(database_url=pg_url, broker_url=redis_url, requeue_after_s="2")
    with api_client(settings) as client:
        job = submit(client, TINY_JOB)
        redis.Redis.from_url(redis_url).flushdb()  # the queued message is gone
        worker = start_worker("flush")
        try:
            j = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
            assert j["status"] == "succeeded", j["error"]
            assert j["attempts"] == 1
        finally:
            stop_process(worker)


def test_job_over_its_time_limit_fails_and_the_worker_lives_on(make_settings, pg_url, redis_url, tmp_path):
    """The time limit reaches the task: the job fails with a one-line cause, once.

    The limit leaves room for the worker's first task to import torch (seconds on a busy machine):
    a limit that runs out before the claim leaves the job queued for the reconciler instead.
    """
    settings = make_settings(database_url=pg_url, broker_url=redis_url, job_time_limit_s="20")
    log = tmp_path / "worker.log"
    with log.open("wb") as log_file:
        worker = start_worker("limit", log_file)
    try:
        with api_client(settings) as client:
            job = submit(client, {**TINY_JOB, "epochs": 1000}, per_class=20)  # far longer than 20 s
            j = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120, log=log)
            assert (j["status"], j["error"]) == ("failed", "exceeded the time limit of 20 s"), log_tail(log)
            assert j["attempts"] == 1 and j["model_id"] is None and len(j["history"]) < 1000
            assert not checkpoint_dir(settings, job["id"]).exists()
            time.sleep(1)
            assert client.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 1  # not run again
            assert worker.poll() is None
    finally:
        stop_process(worker)


def _pool_processes(worker: subprocess.Popen) -> list[int]:
    """The worker's prefork children, which run the tasks (Linux: from /proc)."""
    children = f"/proc/{worker.pid}/task/{worker.pid}/children"
    with open(children, encoding="ascii") as f:
        return [int(pid) for pid in f.read().split()]


def test_job_whose_process_is_killed_every_time_gives_up(make_settings, pg_url, redis_url):
    """The process training the job is SIGKILLed (as the OOM killer does) at every attempt: the
    redelivered message is refused while the heartbeat is fresh, the reconciler re-queues the job
    once it is stale, and after ZOOFIT_JOB_MAX_ATTEMPTS attempts the job fails, saying why."""
    settings = make_settings(database_url=pg_url, broker_url=redis_url, worker_heartbeat_s="1", job_max_attempts="2")
    worker = start_worker("oom", new_session=True)
    try:
        with api_client(settings) as client:
            job = submit(client, {**TINY_JOB, "epochs": 1000}, per_class=20)
            for attempt in (1, 2):
                deadline = time.monotonic() + 180
                j = client.get(f"/v1/jobs/{job['id']}").json()
                while not (j["status"] == "running" and j["attempts"] == attempt
                           and j["progress"].get("stage") == "training"):
                    assert time.monotonic() < deadline and j["status"] in ("queued", "running"), (
                        j["status"], j["attempts"], j["progress"])
                    time.sleep(0.1)
                    j = client.get(f"/v1/jobs/{job['id']}").json()
                for pid in _pool_processes(worker):
                    os.kill(pid, signal.SIGKILL)
            j = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
            gave_up = "gave up after 2 attempts: its worker stopped (stale heartbeat)"
            assert (j["status"], j["error"]) == ("failed", gave_up)
            assert j["attempts"] == 2 and j["model_id"] is None
            assert not checkpoint_dir(settings, job["id"]).exists()
            assert worker.poll() is None  # the worker itself lives on
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
