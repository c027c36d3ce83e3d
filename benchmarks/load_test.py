"""Bounded load test on loopback: concurrent predict and status requests while a job trains.

    .venv/bin/python benchmarks/load_test.py [--clients 16] [--seconds 30]

Starts ``zoofit serve`` (API + worker, embedded broker, a temporary data dir), trains a small
model, then submits a longer training job and, while it runs, hammers ``/predict`` and
``GET /v1/jobs/{id}`` from concurrent clients for a fixed time. Prints requests served, errors
and latency percentiles. Stops by itself; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.demo import _free_port, _wait_ready  # noqa: E402
from service.processes import stop_process  # noqa: E402
from service.sample_data import animal_split, png_bytes, zip_dataset  # noqa: E402

QUICK = {
    "backbone": "tf_efficientnet_lite0", "weights": "bundled", "image_size": 64,
    "freeze": {"mode": "linear_probe"}, "epochs": 2, "batch_size": 32,
    "optimizer": {"name": "adam", "lr": 0.003}, "schedule": {"name": "constant", "warmup_epochs": 0},
}
LONG = {**QUICK, "freeze": {"mode": "first_n", "stages": 3}, "epochs": 200, "patience": None}


async def _client_loop(client, model_id, job_id, images, until, lat, errors, kind):
    i = 0
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            if kind == "predict":
                files = [("files", (f"{i}.png", images[i % len(images)], "image/png"))]
                r = await client.post(f"/v1/models/{model_id}/predict", files=files)
            else:
                r = await client.get(f"/v1/jobs/{job_id}")
            if r.status_code != 200:
                errors.append(f"{kind}: {r.status_code} {r.text[:100]}")
        except httpx.HTTPError as exc:
            errors.append(f"{kind}: {type(exc).__name__}")
        lat[kind].append(time.perf_counter() - t0)
        i += 1


def _pct(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=100)[int(p) - 1] * 1000 if len(xs) >= 2 else float("nan")


async def _load(base, headers, model_id, job_id, images, clients, seconds):
    lat: dict[str, list[float]] = {"predict": [], "status": []}
    errors: list[str] = []
    until = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        await asyncio.gather(*[
            _client_loop(client, model_id, job_id, images, until, lat, errors, "predict" if k % 2 == 0 else "status")
            for k in range(clients)
        ])
    return lat, errors


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="zoofit-load-"))
    port = _free_port()
    env = {**os.environ, "ZOOFIT_DATA_DIR": str(data_dir), "ZOOFIT_PORT": str(port)}
    os.environ.update({"ZOOFIT_DATA_DIR": str(data_dir)})
    from service.auth import create_key
    from service.config import get_settings
    from service.db import session_scope

    with session_scope(get_settings()) as s:
        key = create_key(s, "load")[1]
    headers = {"Authorization": f"Bearer {key}"}
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
            _wait_ready(c, proc)
            train, test = animal_split(per_class=20, test_per_class=5, seed=0)
            ds = c.post("/v1/datasets", files={"file": ("a.zip", zip_dataset(train), "application/zip")}).json()
            job = c.post("/v1/jobs", json={"dataset_id": ds["id"], **QUICK}).json()
            while (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
                time.sleep(0.5)
            assert j["status"] == "succeeded", j["error"]
            model_id = j["model_id"]
            c.post(f"/v1/models/{model_id}/predict",
                   files=[("files", ("w.png", png_bytes(test[0][2]), "image/png"))]).raise_for_status()
            long_job = c.post("/v1/jobs", json={"dataset_id": ds["id"], **LONG}).json()
            while c.get(f"/v1/jobs/{long_job['id']}").json()["status"] != "running":
                time.sleep(0.2)
            images = [png_bytes(img) for _, _, img in test]
            lat, errors = asyncio.run(_load(base, headers, model_id, long_job["id"], images,
                                            args.clients, args.seconds))
            status = c.get(f"/v1/jobs/{long_job['id']}").json()
            c.post(f"/v1/jobs/{long_job['id']}/cancel")
        total = sum(len(v) for v in lat.values())
        print(f"load test: {args.clients} clients for {args.seconds:.0f} s while a job trained "
              f"(job at epoch {status['progress'].get('epoch')}, status {status['status']})")
        print("| request | served | per s | p50 ms | p99 ms |")
        print("| --- | --- | --- | --- | --- |")
        for kind, xs in lat.items():
            print(f"| {kind} | {len(xs)} | {len(xs) / args.seconds:.1f} | {_pct(xs, 50):.0f} | {_pct(xs, 99):.0f} |")
        print(f"total requests {total}, errors {len(errors)}")
        for e in errors[:10]:
            print("  ", e)
        return 1 if errors else 0
    finally:
        stop_process(proc, signal.SIGINT)
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
