"""Predict throughput: the HTTP API with micro-batching against the raw batched forward pass.

    .venv/bin/python benchmarks/bench_predict.py [--image-size 128] [--seconds 6] [--clients 1,8,32] [--threads N]

Trains an ensemble of 3 tf_efficientnet_lite0 members (bundled ImageNet weights, linear probe,
1 epoch: it need not be accurate) through ``zoofit serve``, then starts ``zoofit api`` twice on
the same data folder: with micro-batching as configured by default, and with it off
(``ZOOFIT_PREDICT_BATCH_MAX=1``). Each time, concurrent clients send one 256x256 JPEG per request
for a fixed time; images/s and latency percentiles are measured on the client side. Right before
each of those measurements, with the API idle, this process times the raw forward pass of the same
ensemble on batches of 32 prepared images (``Predictor.predict_proba_views``, the call the batcher
makes): the ceiling each HTTP figure is compared with, measured under the same machine load.
The CPU time per image of the API process and of the raw forward pass is reported too: on a
shared machine their ratio says more than the images/s do. Stops by itself; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load_test import _pct  # noqa: E402
from service.client.api import Zoofit  # noqa: E402
from service.demo import _free_port, _wait_ready  # noqa: E402
from service.processes import stop_process  # noqa: E402
from service.sample_data import animal_split, zip_dataset  # noqa: E402

MEMBERS = 3
RAW_BATCH = 32


def _job(image_size: int) -> dict[str, Any]:
    return {
        "backbone": "tf_efficientnet_lite0", "weights": "bundled", "image_size": image_size,
        "freeze": {"mode": "linear_probe"}, "epochs": 1, "batch_size": 32, "patience": None,
        "optimizer": {"name": "adam", "lr": 0.003}, "schedule": {"name": "constant", "warmup_epochs": 0},
        "ensemble": {"members": MEMBERS},
    }


def _jpeg(image: Any, side: int = 256) -> bytes:
    """A sample image as an upload would be: a few-KB JPEG larger than the model input."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@contextmanager
def _server(command: str, data_dir: Path, headers: dict[str, str],
            **env: str) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes]]]:
    """``zoofit <command>`` on a free port with ``ZOOFIT_<KEY>=value`` settings: a client for it, and the process."""
    port = _free_port()
    full_env = {**os.environ, "ZOOFIT_DATA_DIR": str(data_dir), "ZOOFIT_PORT": str(port),
                **{f"ZOOFIT_{k.upper()}": v for k, v in env.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", command], env=full_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=300) as c:
            _wait_ready(Zoofit(str(c.base_url), http=c), proc)  # demo's helper takes the API client
            yield c, proc
    finally:
        stop_process(proc, signal.SIGINT)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _train(c: httpx.Client, image_size: int) -> str:
    train, _ = animal_split(per_class=4, test_per_class=0, seed=0)
    train = [t for t in train if t[0] in ("bear", "bird", "cat")]  # few images: only the speed of the model matters
    ds = c.post("/v1/datasets", files={"file": ("a.zip", zip_dataset(train), "application/zip")})
    ds.raise_for_status()
    job = c.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **_job(image_size)})
    job.raise_for_status()
    while (j := c.get(f"/v1/jobs/{job.json()['id']}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
    if j["status"] != "succeeded":
        raise RuntimeError(f"training failed: {j['error']}")
    return str(j["model_id"])


async def _client(client: httpx.AsyncClient, url: str, images: list[bytes], start: int, until: float,
                  lat: list[float], errors: list[str]) -> None:
    i = start
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            r = await client.post(url, files=[("files", (f"{i}.jpg", images[i % len(images)], "image/jpeg"))])
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:100]}")
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
        lat.append(time.perf_counter() - t0)
        i += 1


async def _load(base: str, headers: dict[str, str], url: str, images: list[bytes], clients: int,
                seconds: float, cpu: Callable[[], float]) -> tuple[float, list[float], list[str], float]:
    """Images per second, latencies and errors of ``clients`` concurrent one-image clients, and the
    server CPU seconds (``cpu()``) spent during the warm-up before the measured ``seconds``."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120, limits=limits) as client:
        lat: list[float] = []
        errors: list[str] = []
        # Warm-up: connections open, the model loaded, the inference thread started.
        cpu0 = cpu()
        await asyncio.gather(*[_client(client, url, images, k, time.monotonic() + 1.0, [], []) for k in range(clients)])
        warm_cpu = cpu() - cpu0
        t0 = time.monotonic()
        await asyncio.gather(*[_client(client, url, images, k, t0 + seconds, lat, errors) for k in range(clients)])
        elapsed = time.monotonic() - t0
    return len(lat) / elapsed, lat, errors, warm_cpu


class RawForward:
    """The model's forward pass in this process, on a batch of 32 prepared images."""

    def __init__(self, model_dir: Path, images: list[bytes], threads: int | None) -> None:
        import torch

        from models.artifact import load_predictor
        from models.data import open_image
        from models.runtime import available_cpus

        self.threads = threads or available_cpus()  # as the API's inference thread does
        torch.set_num_threads(self.threads)
        self.predictor = load_predictor(model_dir, device="cpu")
        batch = [open_image(images[i % len(images)], f"{i}.jpg") for i in range(RAW_BATCH)]
        self.views = self.predictor.views(batch)
        self.predictor.predict_proba_views(self.views)  # warm-up

    def measure(self, seconds: float) -> tuple[float, float]:
        """Images per second and CPU milliseconds per image of ``predict_proba_views`` on the batch."""
        n = 0
        t0, cpu0 = time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - t0) < seconds or n == 0:
            self.predictor.predict_proba_views(self.views)
            n += RAW_BATCH
        return n / elapsed, 1000 * (time.process_time() - cpu0) / n


@dataclass(frozen=True)
class Row:
    """One concurrency level: the raw forward pass, then the API (CPU: milliseconds per image)."""

    raw_rate: float
    raw_cpu: float
    rate: float
    p50: float
    p99: float
    server_cpu: float
    errors: int


def _measure(c: httpx.Client, pid: int, raw: RawForward, model_id: str, images: list[bytes], levels: list[int],
             seconds: float) -> dict[int, Row]:
    """Per concurrency level: the raw forward pass (the API idle), then the API under load."""
    out = {}
    headers = dict(c.headers)
    for clients in levels:
        raw_rate, raw_cpu = raw.measure(seconds / 2)
        cpu0 = _cpu_seconds(pid)
        rate, lat, errors, warm_cpu = asyncio.run(
            _load(str(c.base_url), headers, f"/v1/models/{model_id}/predict", images, clients, seconds,
                  lambda: _cpu_seconds(pid))
        )
        server_cpu = 1000 * (_cpu_seconds(pid) - cpu0 - warm_cpu) / max(len(lat), 1)
        for e in errors[:3]:
            print("   error:", e, file=sys.stderr)
        out[clients] = Row(raw_rate, raw_cpu, rate, _pct(lat, 50), _pct(lat, 99), server_cpu, len(errors))
        print(f"  {clients} client(s): raw {raw_rate:.1f}, HTTP {rate:.1f} images/s", file=sys.stderr)
    return out



def fresh_store(prefix: str) -> tuple[Path, Any, dict[str, str]]:
    """A new data dir for this process (and the API it starts), its settings, and a key's header."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["ZOOFIT_DATA_DIR"] = str(data_dir)
    from service.auth import create_key
    from service.config import get_settings
    from service.db import session_scope

    settings = get_settings()
    settings.ensure_dirs()
    with session_scope(settings) as s:
        headers = {"Authorization": f"Bearer {create_key(s, 'bench')[1]}"}
    return data_dir, settings, headers

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=128, help="model input side in pixels")
    ap.add_argument("--seconds", type=float, default=6, help="measuring time per concurrency level")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the API's inference (ZOOFIT_PREDICT_THREADS) and of the raw forward; "
                         "default: the API's default, all usable cores")
    args = ap.parse_args()
    started = time.monotonic()
    levels = [int(x) for x in args.clients.split(",")]

    data_dir, settings, headers = fresh_store("zoofit-bench-")
    _, test = animal_split(per_class=0, test_per_class=10, seed=1)
    images = [_jpeg(img) for _, _, img in test]
    try:
        t0 = time.monotonic()
        with _server("serve", data_dir, headers) as (c, _):
            model_id = _train(c, args.image_size)
        print(f"trained {MEMBERS} x tf_efficientnet_lite0 at {args.image_size} px in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)
        raw = RawForward(settings.models_dir / model_id, images, args.threads)
        threads_env = {"predict_threads": str(args.threads)} if args.threads else {}
        runs: dict[str, dict[int, Row]] = {}
        defaults = {"batch_max": settings.predict_batch_max, "wait_ms": settings.predict_batch_wait_ms}
        configs = {
            f"batched (max {defaults['batch_max']}, wait {defaults['wait_ms']:g} ms)": {},
            "unbatched (max 1)": {"predict_batch_max": "1"},
        }
        for name, env in configs.items():
            print(name, file=sys.stderr)
            with _server("api", data_dir, headers, **env, **threads_env) as (c, proc):
                runs[name] = _measure(c, proc.pid, raw, model_id, images, levels, args.seconds)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"\npredict: {MEMBERS} x tf_efficientnet_lite0 at {args.image_size} px, one 256x256 JPEG per request, "
          f"{args.seconds:g} s per level, {raw.threads} torch threads, {os.cpu_count()} CPUs; raw: predict_proba_views "
          f"on batches of {RAW_BATCH} prepared images, in this process, measured right before each HTTP row\n")
    print("CPU ms/img: CPU time per image of the whole API process (all threads), and of the raw forward pass; "
          "their ratio is what HTTP / raw tends to on a quiet machine where the API is CPU-bound\n")
    print("| server | clients | HTTP images/s | p50 ms | p99 ms | errors | raw images/s | HTTP / raw "
          "| API CPU ms/img | raw CPU ms/img | raw / API CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    errors = 0
    for name, results in runs.items():
        for clients, r in results.items():
            errors += r.errors
            print(f"| {name} | {clients} | {r.rate:.1f} | {r.p50:.0f} | {r.p99:.0f} | {r.errors} | {r.raw_rate:.1f} "
                  f"| {r.rate / r.raw_rate:.2f} | {r.server_cpu:.1f} | {r.raw_cpu:.1f} "
                  f"| {r.raw_cpu / r.server_cpu:.2f} |")
    print(f"\nbenchmark wall time {time.monotonic() - started:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
