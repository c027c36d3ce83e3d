"""The production shape: hosts that share PostgreSQL, Redis and an S3 bucket, and no disk.

The API (in this process) and two worker processes each get a data dir and a scratch dir of their
own; datasets, models and checkpoints travel through the bucket (moto's S3 server) only. Two jobs
run at once, one on each worker; one worker is SIGKILLed mid-job and the other takes its job over
from the checkpoint in the bucket.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import pytest

from service.db import JobRow, session_scope
from service.sample_data import png_bytes
from tests.conftest import api_client
from tests.utils.data import TINY_JOB, animals, animals_zip
from tests.utils.events import stream_events
from tests.utils.s3 import bucket_keys, settings_kwargs
from tests.utils.workers import start_worker, wait_status

pytestmark = pytest.mark.integration

# Epochs of 0.3-0.6 s on one thread here: the jobs run side by side for seconds, and the one
# killed after its second epoch has most of its run left.
EPOCHS = 20
PER_CLASS = 20
STORED = ("datasets", "models", "checkpoints")  # what lives in the store, never in a data dir


def stored_files(data_dir: Path) -> list[str]:
    """Files under ``data_dir`` where a local store would keep artifacts."""
    return sorted(str(p.relative_to(data_dir)) for top in STORED if (data_dir / top).exists()
                  for p in (data_dir / top).rglob("*") if p.is_file())


def test_two_hosts_share_only_database_broker_and_bucket(
    make_settings, pg_url, redis_url, s3_settings_env, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="zoofit.storage")
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    api_dirs = {"data": tmp_path / "api" / "data", "scratch": tmp_path / "api" / "scratch"}
    settings = make_settings(
        database_url=pg_url, broker_url=redis_url, worker_heartbeat_s="2",
        data_dir=str(api_dirs["data"]), scratch_dir=str(api_dirs["scratch"]), **settings_kwargs(s3_settings_env),
    )
    endpoint = s3_settings_env["ZOOFIT_S3_ENDPOINT_URL"]
    url = urlparse(s3_settings_env["ZOOFIT_STORAGE_URL"])
    bucket, prefix = url.netloc, url.path.strip("/")

    def keys(key: str) -> list[str]:
        return bucket_keys(endpoint, bucket, f"{prefix}/{key}/")

    hosts = {name: {"data": tmp_path / name / "data", "scratch": tmp_path / name / "scratch"} for name in ("a", "b")}
    workers: dict[str, subprocess.Popen] = {}
    with ExitStack() as cleanup:
        cleanup.callback(lambda: print("\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in timings.items())))
        for name, dirs in hosts.items():
            log = cleanup.enter_context((tmp_path / f"worker-{name}.log").open("wb"))
            workers[name] = start_worker(name, log, new_session=True, env={
                "ZOOFIT_DATA_DIR": str(dirs["data"]),
                "ZOOFIT_SCRATCH_DIR": str(dirs["scratch"]),
                "ZOOFIT_TORCH_THREADS": "1",
                "ZOOFIT_WORKER_CONCURRENCY": "1",
                "ZOOFIT_WORKER_METRICS_PORT": "0",  # two workers on one machine: no port to share
            })
        cleanup.callback(_kill_all, workers)
        client = cleanup.enter_context(api_client(settings))
        # Both up before the jobs go out: else the first one up could take both, one after the other.
        wait_workers(len(workers), workers)
        timings["workers up"] = time.monotonic() - t0

        def job(job_id: str) -> dict:
            return client.get(f"/v1/jobs/{job_id}").json()

        def holder(job_id: str) -> str | None:
            with session_scope(settings) as s:
                row = s.get(JobRow, job_id)
                return row.worker if row is not None else None

        # Two datasets, two jobs sent at once.
        datasets = []
        for _ in range(2):
            r = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(PER_CLASS, 3), "application/zip")})
            assert r.status_code == 201, r.text
            datasets.append(r.json()["id"])
        spec = {**TINY_JOB, "epochs": EPOCHS}
        jobs = []
        for ds in datasets:
            r = client.post("/v1/jobs", json={"dataset_id": ds, **spec})
            assert r.status_code == 202, r.text
            jobs.append(r.json()["id"])
        timings["submitted"] = time.monotonic() - t0

        def checkpointed(job_id: str) -> bool:
            return f"{prefix}/checkpoints/{job_id}/state.safetensors" in keys(f"checkpoints/{job_id}")

        # Both train at once, one on each worker; the first with a checkpoint in the bucket loses its worker.
        deadline = time.monotonic() + 120
        while True:
            js = [job(j) for j in jobs]
            held = [holder(j) for j in jobs]
            assert all(j["status"] in ("queued", "running") for j in js), [(j["status"], j["error"]) for j in js]
            both_training = all(j["status"] == "running" and j["history"] for j in js)
            ready = [i for i, j in enumerate(js) if len(j["history"]) >= 2 and checkpointed(j["id"])]
            if both_training and ready:
                break
            assert time.monotonic() < deadline, [(j["status"], j["progress"]) for j in js]
            time.sleep(0.2)
        timings["both training"] = time.monotonic() - t0
        assert held[0] != held[1] and all(held), held  # at this moment: one job on each worker
        v, o = ready[0], 1 - ready[0]  # indexes of the victim's job and the other
        victim_job, other_job = jobs[v], jobs[o]
        victim_name = str(held[v]).split("-", 1)[0]
        survivor_name = "b" if victim_name == "a" else "a"
        before = js[v]["history"]

        os.killpg(workers[victim_name].pid, signal.SIGKILL)  # the worker and its pool child die at once
        t_kill, killed_at = time.monotonic(), datetime.now(UTC)
        workers[victim_name].wait(10)
        assert job(victim_job)["status"] == "running"

        # The survivor re-queues the stale job, finishes its own, then resumes the victim's.
        j = job(victim_job)
        deadline = time.monotonic() + 150
        while not (j["status"] == "running" and j["attempts"] == 2 and "resumed_from" in j["progress"]):
            assert j["status"] in ("running", "queued"), (j["status"], j["error"])
            assert time.monotonic() < deadline, (j["status"], j["progress"])
            if j["status"] == "queued":
                timings.setdefault("kill -> re-queued", time.monotonic() - t_kill)
            if job(other_job)["status"] == "succeeded":
                timings.setdefault("kill -> survivor's own job done", time.monotonic() - t_kill)
            time.sleep(0.2)
            j = job(victim_job)
        timings["kill -> resumed on the survivor"] = time.monotonic() - t_kill
        other = job(other_job)
        assert other["status"] == "succeeded", other["error"]
        # The victim's first attempt and the other job ran at the same time.
        first_attempt = (datetime.fromisoformat(js[v]["started_at"]), killed_at)
        other_run = (datetime.fromisoformat(other["started_at"]), datetime.fromisoformat(other["finished_at"]))
        assert max(first_attempt[0], other_run[0]) < min(first_attempt[1], other_run[1]), (first_attempt, other_run)
        done = wait_status(client, victim_job, {"succeeded", "failed", "cancelled"}, timeout=120)
        timings["jobs done"] = time.monotonic() - t0
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        assert [h["epoch"] for h in done["history"]] == list(range(EPOCHS))  # one clean run, not two
        resumed = done["progress"]["resumed_from"]
        # Killed once a checkpoint was stored and 2 epochs recorded: an epoch is recorded before its
        # checkpoint is stored, so the stored one may be the epoch before (resumed after epoch 1).
        assert resumed["member"] == 1 and 1 <= resumed["epoch"] < EPOCHS, resumed
        kept = min(resumed["epoch"], len(before))
        assert done["history"][:kept] == before[:kept]
        assert holder(victim_job) == held[o]  # the survivor finished it

        # The event streams name the workers: the jobs overlapped on two of them, and the victim's
        # second attempt ran on the survivor, resumed where the checkpoint was.
        runs = {
            j: [d for _, t, d in stream_events(client, j) if t == "status" and d["status"] == "running"]
            for j in jobs
        }
        assert [r["attempt"] for r in runs[victim_job]] == [1, 2]
        assert [r["attempt"] for r in runs[other_job]] == [1]
        assert runs[victim_job][0]["worker"] != runs[other_job][0]["worker"]
        assert runs[victim_job][1]["worker"] == runs[other_job][0]["worker"]
        restart = [d for _, t, d in stream_events(client, victim_job) if t == "restart"][-1]
        assert restart["attempt"] == 2 and restart["resumed_from"] == resumed
        survivor_log = (tmp_path / f"worker-{survivor_name}.log").read_text(errors="replace")
        assert f"job {victim_job}: resuming after member 1 epoch {resumed['epoch']}" in survivor_log
        # The checkpoint went through the bucket: the victim wrote it in its own scratch, and it is gone
        # from the bucket now the job is done.
        assert (hosts[victim_name]["scratch"] / "checkpoints" / victim_job / "state.safetensors").is_file()
        assert keys(f"checkpoints/{victim_job}") == [] and keys(f"checkpoints/{other_job}") == []

        # Predict from the API: each model is fetched from the bucket into the API's own scratch.
        import models.artifact  # noqa: F401  (torch, imported before the fetch: not part of its timing)

        _, test = animals(PER_CLASS, 2, 3)
        files = [("files", (f"{n}.png", png_bytes(img), "image/png")) for n, _, img in test]
        models = [job(j)["model_id"] for j in jobs]
        for model_id in models:
            assert not (api_dirs["scratch"] / "mirror" / "models" / model_id).exists()
            started, wall = time.monotonic(), time.time()
            r = client.post(f"/v1/models/{model_id}/predict", files=files)
            timings[f"first predict {model_id[:8]} (fetch + load)"] = time.monotonic() - started
            copied = [rec.created for rec in caplog.records
                      if rec.getMessage().startswith(f"copied models/{model_id} ")]
            assert len(copied) == 1, "the API fetched the model once, into its scratch"
            timings[f"request -> model {model_id[:8]} in the API's scratch"] = copied[0] - wall
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) == len(test)
            assert (api_dirs["scratch"] / "mirror" / "models" / model_id / "manifest.json").is_file()
            started = time.monotonic()
            assert client.post(f"/v1/models/{model_id}/predict", files=files).status_code == 200
            timings[f"second predict {model_id[:8]}"] = time.monotonic() - started

        # Nothing relies on a shared disk: no data dir holds a stored artifact.
        for dirs in (api_dirs, *hosts.values()):
            assert stored_files(dirs["data"]) == [], dirs["data"]

        # Deleting removes the objects from the bucket (and the API host's copy).
        for ds in datasets:
            assert keys(f"datasets/{ds}")
            assert client.delete(f"/v1/datasets/{ds}").status_code == 204
            assert keys(f"datasets/{ds}") == []
        for model_id in models:
            assert keys(f"models/{model_id}")
            assert client.delete(f"/v1/models/{model_id}").status_code == 204
            assert keys(f"models/{model_id}") == []
            assert not (api_dirs["scratch"] / "mirror" / "models" / model_id).exists()
        assert workers[survivor_name].poll() is None
        timings["total"] = time.monotonic() - t0


def wait_workers(count: int, procs: dict[str, subprocess.Popen], timeout: float = 90) -> None:
    """Until ``count`` workers answer a ping on the broker."""
    from service.queue import get_celery

    deadline = time.monotonic() + timeout
    while len(get_celery().control.ping(timeout=1.0)) < count:
        assert all(p.poll() is None for p in procs.values()), {n: p.returncode for n, p in procs.items()}
        assert time.monotonic() < deadline, "the workers did not start"


def _kill_all(workers: dict[str, subprocess.Popen]) -> None:
    for p in workers.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
