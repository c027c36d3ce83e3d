"""``zoofit demo``: the main job end to end, through the HTTP API, as a user would run it.

It starts ``zoofit serve`` (API + a real Celery worker) with the configured settings (the
embedded default needs no external services), uploads a real dataset, fine-tunes an ensemble
of ImageNet-pretrained EfficientNet-Lite0 members, and scores held-out images with the
predict endpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from service.processes import stop_process
from service.sample_data import animal_split, png_bytes, zip_dataset

DEMO_JOB: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "weights": "bundled",
    "image_size": 64,
    "freeze": {"mode": "first_n", "stages": 3},
    "head_dropout": 0.2,
    "augment": {"random_resized_crop": True, "crop_scale_min": 0.7, "hflip": True, "color_jitter": 0.1},
    "optimizer": {"name": "nesterov", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
    "epochs": 8,
    "batch_size": 32,
    "patience": 3,
    "seed": 0,
    "ensemble": {"members": 3},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zoofit serve exited with code {proc.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("zoofit serve did not become ready in time")


def _demo_key() -> str:
    """The demo issues its own API key, as an operator would with ``zoofit keys create``."""
    from service.auth import create_key
    from service.config import get_settings
    from service.db import session_scope

    with session_scope(get_settings()) as session:
        return create_key(session, "demo")[1]


def run_demo(port: int | None = None, per_class: int | None = None, job: dict[str, Any] | None = None) -> int:
    port = port or _free_port()
    per_class = per_class or 50
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ZOOFIT_PORT": str(port), "ZOOFIT_HOST": "127.0.0.1"}
    print(f"starting zoofit serve on {base} (API + Celery worker)", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL if not os.environ.get("ZOOFIT_DEMO_VERBOSE") else None,
                            stderr=subprocess.STDOUT if not os.environ.get("ZOOFIT_DEMO_VERBOSE") else None)
    headers = {"Authorization": f"Bearer {_demo_key()}"}
    try:
        with httpx.Client(base_url=base, timeout=120, headers=headers) as client:
            _wait_ready(client, proc)
            return _walk(client, per_class, job or DEMO_JOB)
    finally:
        stop_process(proc, signal.SIGINT)


def _walk(client: httpx.Client, per_class: int, job: dict[str, Any]) -> int:
    t0 = time.monotonic()
    train, test = animal_split(per_class=per_class, test_per_class=20, seed=0)
    archive = zip_dataset(train)
    r = client.post("/v1/datasets", files={"file": ("animals.zip", archive, "application/zip")})
    r.raise_for_status()
    ds = r.json()
    print(f"uploaded dataset {ds['id']}: {ds['num_images']} images, classes {ds['counts']}", flush=True)

    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], **job})
    if r.status_code != 202:
        print(f"job rejected: {r.status_code} {r.text}")
        return 1
    job_id = r.json()["id"]
    print(f"submitted job {job_id}: {job['backbone']} x{job['ensemble']['members']}, "
          f"{job['optimizer']['name']}, {job['schedule']['name']} schedule", flush=True)

    last = None
    while True:
        j = client.get(f"/v1/jobs/{job_id}").json()
        p = j["progress"]
        line = f"  [{j['status']}] " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()
        )
        if line != last:
            print(line, flush=True)
            last = line
        if j["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1.0)
    if j["status"] != "succeeded":
        print(f"job {j['status']}: {j['error']}")
        return 1
    m = j["metrics"]
    print(f"validation accuracy: members {[round(a, 3) for a in m.get('member_val_acc', [])]}, "
          f"ensemble {m.get('val_acc', float('nan')):.3f}", flush=True)

    model_id = j["model_id"]
    correct = 0
    for start in range(0, len(test), 32):
        batch = test[start : start + 32]
        files = [("files", (f"{name}-{i}.png", png_bytes(img), "image/png")) for name, i, img in batch]
        r = client.post(f"/v1/models/{model_id}/predict", files=files, params={"top_k": 3})
        r.raise_for_status()
        for (name, _i, _img), pred in zip(batch, r.json()["predictions"], strict=True):
            correct += pred["top_k"][0]["label"] == name
    acc = correct / len(test)
    print(f"held-out accuracy from /predict: {acc:.3f} ({correct}/{len(test)} images, "
          f"{len(test) // 10} per class, never uploaded)")
    print(f"model {model_id}; end-to-end job time {time.monotonic() - t0:.1f} s")
    return 0
