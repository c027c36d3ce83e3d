"""``zoofit demo``: the main job end to end, through the HTTP API, as a user would run it.

It starts ``zoofit serve`` (API + a real Celery worker) with the configured settings (the
embedded default needs no external services), then goes through ``service.client`` as the
``zoofit`` subcommands do: uploads a folder of real images (zipped on the fly), fine-tunes an
ensemble of ImageNet-pretrained EfficientNet-Lite0 members while the same watcher as
``zoofit jobs watch`` draws the event stream, and scores held-out images with the predict endpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from service.client import ApiError, Zoofit
from service.client.watch import watch
from service.processes import stop_process
from service.sample_data import animal_split, png_bytes

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


def _wait_ready(zf: Zoofit, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zoofit serve exited with code {proc.returncode}")
        if zf.ready():
            return
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
    try:
        with Zoofit(base, _demo_key(), timeout=120) as zf:
            _wait_ready(zf, proc)
            return _walk(zf, per_class, job or DEMO_JOB)
    except ApiError as exc:
        print(f"the API refused: {exc.message}")
        return 1
    finally:
        stop_process(proc, signal.SIGINT)


def _write_pngs(folder: Path, items: list, by_class: bool) -> list[Path]:
    paths = []
    for name, i, image in items:
        path = folder / name / f"{i}.png" if by_class else folder / f"{name}-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image))
        paths.append(path)
    return paths


def _walk(zf: Zoofit, per_class: int, job: dict[str, Any]) -> int:
    """What a user does with ``zoofit datasets upload``, ``jobs submit --watch`` and ``models predict``."""
    t0 = time.monotonic()
    train, test = animal_split(per_class=per_class, test_per_class=20, seed=0)
    with tempfile.TemporaryDirectory(prefix="zoofit-demo-") as tmp:
        folder = Path(tmp) / "animals"
        _write_pngs(folder, train, by_class=True)
        ds = zf.upload_dataset(folder)  # a folder of <class>/<image>, zipped on the fly
        print(f"uploaded dataset {ds['id']}: {ds['num_images']} images, classes {ds['counts']}", flush=True)

        job_id = zf.create_job({"dataset_id": ds["id"], **job})["id"]
        print(f"submitted job {job_id}: {job['backbone']} x{job['ensemble']['members']}, "
              f"{job['optimizer']['name']}, {job['schedule']['name']} schedule", flush=True)
        done = watch(zf.events(job_id), job_id, Console(stderr=True), Console())
        if done["status"] != "succeeded":
            return 1

        model_id = done["model_id"]
        held_out = _write_pngs(Path(tmp) / "held-out", test, by_class=False)
        correct = 0
        for start in range(0, len(test), 32):
            body = zf.predict(model_id, held_out[start : start + 32], top_k=3)
            for (name, _i, _img), pred in zip(test[start : start + 32], body["predictions"], strict=True):
                correct += pred["top_k"][0]["label"] == name
    acc = correct / len(test)
    print(f"held-out accuracy from /predict: {acc:.3f} ({correct}/{len(test)} images, "
          f"{len(test) // 10} per class, never uploaded)")
    print(f"model {model_id}; end-to-end job time {time.monotonic() - t0:.1f} s")
    return 0
