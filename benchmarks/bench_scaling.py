"""Past one host: job throughput with 1 and 2 worker processes, fetches from the store, control-plane load.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_scaling [--jobs 8] [--epochs 4] [--workers 1,2]
        [--images 500] [--threads 1,16] [--repeats 2] [--no-big-model] [--json out.json]

Real parts only, as a multi-host deployment has them: a moto S3 server in a child process (real HTTP
on loopback; ``tests/utils/s3.py``), a fresh PostgreSQL database (``ZOOFIT_TEST_PG_ADMIN``, dropped
after), Redis db 10 as the broker (``ZOOFIT_BENCH_REDIS``, flushed before and after), and real Celery
workers (``python -m service.cli worker --hostname ...``), each with its own ``ZOOFIT_DATA_DIR`` and
``ZOOFIT_SCRATCH_DIR`` and one torch thread, sharing nothing but PostgreSQL, Redis and the bucket.
The API runs in this process (FastAPI's TestClient) with the real ``enqueue``. Four parts:

1. Throughput: ``--jobs`` identical small jobs (the tests' tiny recipe, ``test_efficientnet`` at
   32 px, ``--epochs`` epochs, 18 animal-mnist images) with 1 worker, then with 2 fresh workers.
   Each worker first runs one warm-up job (its pool process imports torch and copies the dataset
   into its scratch); the figure is submit-to-all-succeeded of the next ``--jobs``.
2. Fetches from the store into an empty scratch folder: a ``--images`` image dataset (real
   512x512 ImageNet JPEGs from the foolbox wheel, uploaded through the API) with
   ``ZOOFIT_S3_TRANSFER_THREADS`` 1 and 16; a trained model as predict loads it
   (``service.models_store.model_files``); and a training checkpoint (``get_file`` and ``put_file``
   of ``checkpoints/<job>/state.safetensors``). Unless ``--no-big-model`` the model and the
   checkpoint are a real ``tf_efficientnet_lite0`` full fine-tune's, trained by a worker; the
   checkpoint is copied aside inside the bucket while the job runs (the job removes its own at the end).
3. Control-plane load of the real workers, per phase: PostgreSQL's own counters
   (``pg_stat_user_tables``, ``pg_stat_database``), read after the workers have exited (a backend
   flushes its counters when it ends); connections per worker (``pg_stat_activity``, each worker's
   ``application_name``); every Redis command on the broker's db (``MONITOR``); every S3 request
   (moto's request log).
4. The same recipe run in this process by ``workers.jobs.run_job`` with ``--epochs`` and
   ``--epochs + 4`` epochs and a 0.5 s heartbeat, every SQL statement counted by the code path that
   issued it (found on the call stack): per epoch, per heartbeat, per cancellation poll, per job.

moto is a Python server on the same two cores as everything else: its MB/s are a floor for this
code path, not what MinIO or S3 would give. About 3.5 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import Settings, get_settings  # noqa: E402
from service.db import DatasetRow, JobRow, ModelRow, session_scope  # noqa: E402

REDIS_URL = os.environ.get("ZOOFIT_BENCH_REDIS", "redis://127.0.0.1:6379/10")
REDIS_DB = int(REDIS_URL.rsplit("/", 1)[1])
TENANT = "bench"
BIG_JOB = {  # a real-sized model and checkpoint: Lite0, every weight trained (Adam moments in the checkpoint)
    "backbone": "tf_efficientnet_lite0",
    "weights": "bundled",
    "image_size": 64,
    "freeze": {"mode": "none"},
    "epochs": 4,
    "batch_size": 8,
    "schedule": {"name": "constant", "warmup_epochs": 0},
    "optimizer": {"name": "adam", "lr": 0.001},
    "patience": None,
}
MB = 1e6


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", flush=True)


# --- the shared parts ---------------------------------------------------------------------------------


def pg_database() -> contextlib.AbstractContextManager[str]:
    """A fresh PostgreSQL database at this release's schema, dropped after (the tests' own helper;
    ``ZOOFIT_TEST_PG_ADMIN`` names the server)."""
    from tests.conftest import pg_database as test_database

    return test_database("zoofit_bench")


@contextlib.contextmanager
def redis_db() -> Iterator[str]:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    try:
        yield REDIS_URL
    finally:
        r.flushdb()
        r.close()


class RedisMonitor:
    """Every command Redis runs on the broker's db (``MONITOR``), with its time, from a thread."""

    def __init__(self) -> None:
        import redis

        self._redis = redis.Redis.from_url(REDIS_URL, socket_timeout=None)
        self.commands: list[tuple[float, str, str]] = []  # (time, command, first argument)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-redis-monitor", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        import redis

        while not self._stop.is_set():
            try:
                with self._redis.monitor() as m:
                    self._ready.set()
                    for cmd in m.listen():
                        if self._stop.is_set():
                            return
                        if int(cmd.get("db", -1)) != REDIS_DB:
                            continue
                        words = str(cmd.get("command", "")).split()
                        name = words[0].upper() if words else "?"
                        arg = words[1] if len(words) > 1 else ""
                        self.commands.append((float(cmd.get("time", time.time())), name, arg))
            except (redis.TimeoutError, redis.ConnectionError):
                continue  # a quiet spell: watch again

    def between(self, t0: float, t1: float) -> Counter[str]:
        return Counter(name for t, name, _ in list(self.commands) if t0 <= t <= t1)

    def sends(self, t0: float, t1: float, queue: str = "train") -> int:
        return sum(1 for t, name, arg in list(self.commands) if t0 <= t <= t1 and name == "LPUSH" and arg == queue)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._redis.ping()  # one more command wakes the listener
        self._thread.join(timeout=5)


def pg_counters(url: str) -> dict[str, int]:
    """PostgreSQL's cumulative counters of the database: rows written per table, transactions."""
    engine = create_engine(url, poolclass=NullPool)
    out: dict[str, int] = {}
    with engine.connect() as conn:
        for rel, ins, upd, dele, seq, idx in conn.execute(text(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del, seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables"
        )):
            out[f"{rel}.ins"], out[f"{rel}.upd"], out[f"{rel}.del"] = ins, upd, dele
            out[f"{rel}.scans"] = seq + idx
        commits, rollbacks = conn.execute(text(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )).one()
        out["xact_commit"], out["xact_rollback"] = commits, rollbacks
    engine.dispose()
    return out


def with_app_name(url: str, name: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


class Connections:
    """The most connections to the database seen at once, per ``application_name`` (sampled)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, poolclass=NullPool)
        self.most: Counter[str] = Counter()

    def sample(self) -> None:
        with self.engine.connect() as conn:
            for name, n in conn.execute(text(
                "SELECT application_name, count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1"
            )):
                self.most[name] = max(self.most[name], n)

    def close(self) -> None:
        self.engine.dispose()


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# --- workers ------------------------------------------------------------------------------------------


class Worker:
    """``python -m service.cli worker`` with a data dir and scratch of its own; its log in a file."""

    def __init__(self, name: str, root: Path, env: dict[str, str]) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.log = self.dir / "worker.log"
        wenv = {k: v for k, v in os.environ.items() if not k.startswith("ZOOFIT_")}
        wenv.update(env)
        wenv.update({
            "ZOOFIT_DATA_DIR": str(self.dir / "data"),
            "ZOOFIT_SCRATCH_DIR": str(self.dir / "scratch"),
            "ZOOFIT_TORCH_THREADS": "1",
            "ZOOFIT_WORKER_METRICS_PORT": "0",  # two workers on one host: no port to share
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
        })
        # Its connections named after it in pg_stat_activity (libpq's application_name).
        wenv["ZOOFIT_DATABASE_URL"] = with_app_name(env["ZOOFIT_DATABASE_URL"], name)
        with self.log.open("wb") as out:  # a file, not a pipe nobody reads (it would block the worker)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker", "--hostname", f"{name}@%h"],
                cwd=REPO, env=wenv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready in {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown: the pool process exits too
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its processes
                self.proc.wait()


def start_workers(names: list[str], root: Path, env: dict[str, str]) -> list[Worker]:
    workers = [Worker(n, root, env) for n in names]
    try:
        for w in workers:
            w.wait_ready()
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


# --- the API in this process --------------------------------------------------------------------------


def api_settings(env: dict[str, str]) -> Settings:
    """Point this process's ``get_settings()`` (and the Celery app) at ``env``."""
    from service.queue import get_celery

    for k in [k for k in os.environ if k.startswith("ZOOFIT_")]:
        del os.environ[k]
    os.environ.update(env)
    get_settings.cache_clear()
    get_celery.cache_clear()
    settings = get_settings()
    settings.ensure_dirs()
    return settings


def api_client(settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key

    with session_scope(settings) as s:
        key = create_key(s, TENANT)[1]
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app, headers={"Authorization": f"Bearer {key}"})


def upload(client: Any, name: str, data: bytes) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = client.post("/v1/datasets", files={"file": (name, data, "application/zip")})
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
    return r.json()["id"], time.perf_counter() - t0


def submit(client: Any, dataset_id: str, recipe: dict[str, Any]) -> str:
    r = client.post("/v1/jobs", json={"dataset_id": dataset_id, **recipe})
    if r.status_code != 202:
        raise RuntimeError(f"submit failed: {r.status_code} {r.text}")
    return str(r.json()["id"])


def wait_done(url: str, ids: list[str], timeout: float, tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Poll the jobs' rows (one read-only query on a connection of its own) until all have ended."""
    engine = create_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + timeout
    try:
        with engine.connect() as conn:
            while True:
                rows = conn.execute(
                    select(JobRow.id, JobRow.status, JobRow.error, JobRow.worker, JobRow.model_id, JobRow.created_at,
                           JobRow.started_at, JobRow.finished_at)
                    .where(JobRow.id.in_(ids))
                ).all()
                conn.rollback()
                if all(r.status in ("succeeded", "failed", "cancelled") for r in rows) and len(rows) == len(ids):
                    bad = [r for r in rows if r.status != "succeeded"]
                    if bad:
                        raise RuntimeError(f"jobs did not succeed: {[(r.id, r.status, r.error) for r in bad]}")
                    return {r.id: r for r in rows}
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jobs not done in {timeout:.0f} s: {[(r.id, r.status) for r in rows]}")
                if tick is not None:
                    tick()
                time.sleep(0.1)
    finally:
        engine.dispose()


# --- data ---------------------------------------------------------------------------------------------


def photo_zip(images: int, classes: int = 10) -> bytes:
    """``images`` real 512x512 ImageNet JPEGs (the foolbox wheel's 20, repeated) in ``classes`` folders."""
    import importlib.util

    found = importlib.util.find_spec("foolbox")  # found, not imported: only its data files are used
    if found is None or not found.submodule_search_locations:
        raise SystemExit("the foolbox wheel is not installed: pip install --no-deps foolbox==3.3.4")
    photos = sorted((Path(next(iter(found.submodule_search_locations))) / "data").glob("imagenet_*.jpg"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(images):
            zf.writestr(f"photos/c{i % classes}/{i:04d}.jpg", photos[i % len(photos)].read_bytes())
    return buf.getvalue()


# --- part 1 and 3: throughput with real workers, and what they cost the database and the broker --------


def throughput_phase(
    n_workers: int, root: Path, worker_env: dict[str, str], client: Any, settings: Settings, dataset_id: str,
    recipe: dict[str, Any], jobs: int, rounds: int, monitor: RedisMonitor, idle_s: float, moto_log: Path,
) -> tuple[dict[str, Any], list[Worker]]:
    """Start ``n_workers`` fresh workers, warm each up with one job, then time ``rounds`` batches of ``jobs``."""
    url = settings.resolved_database_url.split("?")[0]  # the bench's own connections: unnamed
    say(f"{n_workers} worker(s): starting")
    t0 = time.perf_counter()
    workers = start_workers([f"w{n_workers}{chr(97 + i)}" for i in range(n_workers)], root, worker_env)
    started_s = time.perf_counter() - t0
    try:
        idle = Counter[str]()
        if idle_s > 0:
            time.sleep(2.0)  # past what a worker does once at start (restoring unacked messages)
            t_idle = time.time()
            time.sleep(idle_s)
            idle = monitor.between(t_idle, time.time())
        t0 = time.perf_counter()
        warm = [submit(client, dataset_id, recipe) for _ in range(n_workers)]
        wait_done(url, warm, 300)
        warm_s = time.perf_counter() - t0
        say(f"{n_workers} worker(s): warmed up ({warm_s:.1f} s); timing {rounds} x {jobs} jobs")
        t_sub = time.time()
        s3_from = moto_log.stat().st_size
        conns = Connections(url)
        walls, rows = [], {}
        for _ in range(rounds):  # the workers stay up: a burst of someone else's load hits one round
            t0 = time.perf_counter()
            ids = [submit(client, dataset_id, recipe) for _ in range(jobs)]
            rows.update(wait_done(url, ids, 600, tick=conns.sample))
            walls.append(time.perf_counter() - t0)
        conns.close()
        t_end = time.time()
        timed = jobs * rounds
        wall = statistics.median(walls)
        result = {
            "workers": n_workers, "jobs": jobs, "rounds": rounds, "walls_s": walls, "wall_s": wall,
            "jobs_per_min": 60 * jobs / wall, "start_s": started_s, "warmup_s": warm_s, "load": load(),
            "per_worker": dict(Counter(str(r.worker).split("@")[0] for r in rows.values())),
            "in_worker_s": statistics.median((r.finished_at - r.started_at).total_seconds() for r in rows.values()),
            "spans": job_spans(url, list(rows)),
            "connections": dict(conns.most),
            "timed_jobs": timed,
            "s3_requests": dict(s3_requests(moto_log, s3_from)),
            "redis_idle_per_s": sum(idle.values()) / idle_s if idle_s > 0 else None,
            "redis_idle": dict(idle),
            "redis_timed": dict(monitor.between(t_sub, t_end)),
            "redis_sends": monitor.sends(t_sub, t_end),
            "timed_window_s": t_end - t_sub,
            "all_jobs": timed + n_workers,
        }
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return result, workers


# Where a job's time goes, from its events' timestamps (written by the worker as it goes).
SPANS = ("claimed -> decoding", "decoding -> training", "training -> first epoch", "each later epoch",
         "last epoch -> saving", "saving -> done")


def job_spans(url: str, ids: list[str]) -> dict[str, float]:
    """Median seconds of each span of ``SPANS`` over the jobs ``ids``."""
    from service.db import JobEventRow

    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobEventRow.job_id, JobEventRow.type, JobEventRow.data, JobEventRow.created_at)
            .where(JobEventRow.job_id.in_(ids)).order_by(JobEventRow.id)
        ).all()
    engine.dispose()
    spans: dict[str, list[float]] = {k: [] for k in SPANS}
    for job_id in ids:
        marks: dict[str, float] = {}
        epochs: list[float] = []
        for r in (r for r in rows if r.job_id == job_id):
            t = r.created_at.timestamp()
            if r.type == "status" and r.data.get("status") == "running":
                marks["claimed"] = t
            elif r.type == "stage":
                marks.setdefault(str(r.data.get("stage")), t)
            elif r.type == "epoch":
                epochs.append(t)
        if not epochs or not {"claimed", "decoding images", "training", "saving model", "done"} <= marks.keys():
            continue
        spans["claimed -> decoding"].append(marks["decoding images"] - marks["claimed"])
        spans["decoding -> training"].append(marks["training"] - marks["decoding images"])
        spans["training -> first epoch"].append(epochs[0] - marks["training"])
        spans["each later epoch"] += [b - a for a, b in zip(epochs, epochs[1:], strict=False)]
        spans["last epoch -> saving"].append(marks["saving model"] - epochs[-1])
        spans["saving -> done"].append(marks["done"] - marks["saving model"])
    return {k: statistics.median(v) for k, v in spans.items() if v}


def s3_requests(moto_log: Path, offset: int) -> Counter[str]:
    """The S3 requests moto logged after ``offset``, by method and kind of key (``PUT checkpoints``)."""
    with moto_log.open("rb") as f:
        f.seek(offset)
        lines = re.sub(r"\x1b\[[0-9;]*m", "", f.read().decode(errors="replace")).splitlines()  # no colours
    out: Counter[str] = Counter()
    for line in lines:
        if '"' not in line:
            continue
        request = line.split('"')[1].split()
        if len(request) < 2 or request[1].startswith("/moto-api"):
            continue
        method, target = request[0], urllib.parse.urlsplit(request[1])
        parts = target.path.strip("/").split("/")  # bucket, prefix, kind, ...
        if len(parts) > 2:
            out[f"{method} {parts[2]}"] += 1
        elif method == "GET" and "prefix" in (query := urllib.parse.parse_qs(target.query)):
            listed = query["prefix"][0].strip("/").split("/")  # prefix, kind, ...
            out[f"LIST {listed[1] if len(listed) > 1 else '?'}"] += 1
        elif method == "POST" and "delete" in target.query:
            out["DELETE (batch)"] += 1
        else:
            out[f"{method} (bucket)"] += 1
    return out


def close_phase(result: dict[str, Any], workers: list[Worker], settings: Settings, before: dict[str, int]) -> None:
    from service.db import get_engine

    for w in workers:
        w.stop()
    get_engine(settings).dispose()
    time.sleep(1.0)  # the backends' exits flush their counters
    result["pg"] = delta(pg_counters(settings.resolved_database_url.split("?")[0]), before)


# --- part 2: fetches ----------------------------------------------------------------------------------


def timed_tree(
    settings: Settings, scratch: Path, key: str, threads: int, skip: tuple[str, ...] = ()
) -> tuple[float, int, int]:
    """Seconds to copy the stored tree ``key`` into the empty ``scratch`` (a fresh store client), bytes, objects."""
    from service.storage import open_store
    from service.storage.mirror import Mirror

    variant = settings.model_copy(update={"s3_transfer_threads": threads})
    store = open_store(variant)
    mirror = Mirror(store, scratch, settings.scratch_max_bytes, threads=threads)
    t0 = time.perf_counter()
    local = mirror.tree(key, skip=skip)
    secs = time.perf_counter() - t0
    files = [p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".zoofit")]
    return secs, sum(p.stat().st_size for p in files), len(files)


def fetch_figures(settings: Settings, root: Path, dataset_key: str, model_key: str | None, ckpt_key: str | None,
                  threads: list[int], repeats: int) -> list[dict[str, Any]]:
    from service.models_store import NOT_LOADED
    from service.storage import open_store

    rows: list[dict[str, Any]] = []
    runs: dict[int, list[tuple[float, int, int]]] = {t: [] for t in threads}
    for rep in range(repeats):
        for t in threads:  # interleaved: load changes hit both settings alike
            runs[t].append(timed_tree(settings, root / f"ds-{t}-{rep}", dataset_key, t))
            shutil.rmtree(root / f"ds-{t}-{rep}", ignore_errors=True)
    for t in threads:
        secs = statistics.median(r[0] for r in runs[t])
        _, size, n = runs[t][0]
        rows.append({"what": f"dataset ({n} JPEGs), transfer threads {t}", "threads": t, "s": secs, "bytes": size,
                     "objects": n, "load": load()})
    if model_key is not None:
        t = settings.s3_transfer_threads
        got = [timed_tree(settings, root / f"model-{rep}", model_key, t, NOT_LOADED) for rep in range(repeats)]
        _, size, n = got[0]
        rows.append({"what": f"trained model as predict loads it ({n} files), threads {t}", "threads": t,
                     "s": statistics.median(g[0] for g in got), "bytes": size, "objects": n, "load": load()})
    if ckpt_key is not None:
        store = open_store(settings)
        size = store.info(ckpt_key).size
        gets, puts = [], []
        for rep in range(repeats):
            dest = root / f"ckpt-{rep}" / "state.safetensors"
            t0 = time.perf_counter()
            store.get_file(ckpt_key, dest)
            gets.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store.put_file(f"bench/put-{rep}/state.safetensors", dest)  # what a worker pays after every epoch
            puts.append(time.perf_counter() - t0)
        rows.append({"what": "checkpoint get_file (a worker taking a job over)",
                     "threads": settings.s3_transfer_threads, "s": statistics.median(gets), "bytes": size,
                     "objects": 1, "load": load()})
        rows.append({"what": "checkpoint put_file (every epoch of an explicit recipe)",
                     "threads": settings.s3_transfer_threads, "s": statistics.median(puts), "bytes": size,
                     "objects": 1, "load": load()})
    return rows


def capture_checkpoint(endpoint: str, bucket: str, prefix: str, job_id: str, stop: threading.Event,
                       got: list[str]) -> None:
    """Copy the running job's checkpoint aside inside the bucket as soon as it exists (the job drops its own)."""
    from tests.utils.s3 import s3_client

    client = s3_client(endpoint)
    src = f"{prefix}/checkpoints/{job_id}/state.safetensors"
    dst = "bench/captured/state.safetensors"
    while not stop.is_set():
        try:
            client.copy_object(Bucket=bucket, Key=f"{prefix}/{dst}", CopySource={"Bucket": bucket, "Key": src})
            got.append(dst)
            return
        except Exception:
            time.sleep(0.1)


# --- part 4: statements per code path, in this process -------------------------------------------------

# Innermost function on the call stack that names what a statement is for.
PATHS = {
    "beat": "heartbeat",
    "on_epoch": "epoch (progress + event)",
    "should_stop": "cancellation poll",
    "claim_job": "claim",
    "stage": "stage events",
    "start_over": "stage events",
    "resumed": "stage events",
    "_conclude": "outcome",
    "admit": "admission (after the job)",
    "_run_claimed": "load job, outcome, model row",
}


class StatementCounter:
    """``before_cursor_execute`` and ``commit`` on an engine, attributed to the code path that issued them."""

    def __init__(self) -> None:
        self.on = False
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    @staticmethod
    def _path() -> str:
        f = sys._getframe(2)
        while f is not None:
            name = f.f_code.co_name
            if name in PATHS and ("workers" in f.f_code.co_filename or "service" in f.f_code.co_filename):
                return PATHS[name]
            f = f.f_back  # type: ignore[assignment]
        return "other"

    def statement(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not self.on:
            return
        words = statement.split()
        verb = words[0].upper() if words else "?"
        if verb == "SELECT" and "FOR UPDATE" in statement.upper():
            verb = "SELECT FOR UPDATE"
        with self._lock:
            self.counts[(self._path(), verb)] += 1

    def commit(self, _conn: Any) -> None:
        if self.on:
            with self._lock:
                self.counts[(self._path(), "COMMIT")] += 1


def inprocess_jobs(client: Any, settings: Settings, dataset_id: str, recipe: dict[str, Any],
                   epochs: list[int]) -> dict[str, Any]:
    from service.admission import admit
    from service.api.deps import get_enqueue
    from service.db import get_engine
    from workers.jobs import run_job

    app = client.app
    app.dependency_overrides[get_enqueue] = lambda: (lambda _job_id: None)  # this process is the worker
    wsettings = settings.model_copy(update={"worker_heartbeat_s": 0.5, "torch_threads": 1})
    counter = StatementCounter()
    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", counter.statement)
    event.listen(engine, "commit", counter.commit)
    out: dict[str, Any] = {"heartbeat_s": wsettings.worker_heartbeat_s, "runs": []}
    try:
        # Uncounted: this process imports torch and copies the dataset into its scratch once.
        warm = submit(client, dataset_id, {**recipe, "epochs": 1})
        run_job(warm, worker="bench-inprocess@host", settings=wsettings)
        for e in epochs:
            job_id = submit(client, dataset_id, {**recipe, "epochs": e})
            counter.counts.clear()
            counter.on = True
            t0 = time.perf_counter()
            status = run_job(job_id, worker="bench-inprocess@host", settings=wsettings)
            secs = time.perf_counter() - t0
            admit(wsettings, lambda _job_id: None)
            counter.on = False
            if status != "succeeded":
                raise RuntimeError(f"in-process job {job_id}: {status}")
            counts = {f"{p}|{v}": n for (p, v), n in counter.counts.items()}
            out["runs"].append({"epochs": e, "s": secs, "counts": counts})
    finally:
        event.remove(engine, "before_cursor_execute", counter.statement)
        event.remove(engine, "commit", counter.commit)
        del app.dependency_overrides[get_enqueue]
    return out


# --- report -------------------------------------------------------------------------------------------


def per_path(run: dict[str, Any]) -> dict[str, Counter[str]]:
    paths: dict[str, Counter[str]] = {}
    for k, n in run["counts"].items():
        path, verb = k.split("|")
        paths.setdefault(path, Counter())[verb] += n
    return paths


def writes(c: Counter[str]) -> int:
    return c["INSERT"] + c["UPDATE"] + c["DELETE"]


def report(args: argparse.Namespace, phases: list[dict[str, Any]], fetches: list[dict[str, Any]],
           inproc: dict[str, Any], total_s: float) -> None:
    print()
    print(f"## bench_scaling: {args.rounds} x {args.jobs} jobs x {args.epochs} epochs (test_efficientnet, 32 px, "
          f"18 images), 1 torch thread per worker; whole run {total_s:.0f} s; load (1/5/15 min) at the end {load()}")
    print()
    print("| workers | jobs | submit to all succeeded (median; rounds) | jobs/min | vs 1 worker | jobs per worker | "
          "median job, claim to outcome | worker start / warm-up job | load at end |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    base = phases[0]["jobs_per_min"]
    for p in phases:
        split = " / ".join(str(v) for _, v in sorted(p["per_worker"].items()))
        rounds = ", ".join(f"{w:.1f}" for w in p["walls_s"])
        print(f"| {p['workers']} | {p['jobs']} | {p['wall_s']:.1f} s ({rounds}) | {p['jobs_per_min']:.1f} | "
              f"**{p['jobs_per_min'] / base:.2f}x** | {split} | {p['in_worker_s']:.2f} s | "
              f"{p['start_s']:.1f} s / {p['warmup_s']:.1f} s | {p['load']} |")
    print()
    print("Where a job's time goes (median seconds, from the timestamps of its events):")
    print()
    print("| span | " + " | ".join(f"{p['workers']} worker(s)" for p in phases) + " |")
    print("| --- | " + " | ".join("---:" for _ in phases) + " |")
    for span in SPANS:
        print(f"| {span} | " + " | ".join(f"{p['spans'].get(span, float('nan')):.3f}" for p in phases) + " |")
    print()
    print("| fetch into an empty scratch (moto on loopback) | MB | objects | seconds | MB/s | objects/s | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for f in fetches:
        print(f"| {f['what']} | {f['bytes'] / MB:.1f} | {f['objects']} | {f['s']:.2f} | "
              f"{f['bytes'] / MB / f['s']:.1f} | {f['objects'] / f['s']:.0f} | {f['load']} |")
    ds = [f for f in fetches if f["what"].startswith("dataset")]
    if len(ds) == 2:
        print(f"\ndataset fetch, {ds[1]['threads']} vs {ds[0]['threads']} transfer threads: "
              f"**{ds[0]['s'] / ds[1]['s']:.2f}x** faster")
    print(f"upload of the {args.images}-image dataset through the API (zip, ingest, put_tree): "
          f"{args.upload_s:.1f} s for {args.upload_bytes / MB:.1f} MB")

    one = phases[0]
    print()
    print(f"PostgreSQL's counters per job over each phase (workers' start and stop, warm-up and timed jobs of "
          f"{args.epochs} epochs, the API's submits), read after the workers exited:")
    print()
    print("| workers | jobs | jobs rows inserted / updated | job_events rows inserted | models rows inserted | "
          "transactions committed (reads included) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for p in phases:
        pg, n = p["pg"], p["all_jobs"]
        print(f"| {p['workers']} | {n} | {pg.get('jobs.ins', 0) / n:.1f} / {pg.get('jobs.upd', 0) / n:.1f} | "
              f"{pg.get('job_events.ins', 0) / n:.1f} | {pg.get('models.ins', 0) / n:.1f} | "
              f"{pg['xact_commit'] / n:.1f} |")
    for p in phases:
        named = ", ".join(f"{k or 'this bench'} {v}" for k, v in sorted(p["connections"].items()))
        print(f"PostgreSQL connections at most during the timed jobs, {p['workers']} worker(s): {named}")
    s3 = Counter(one["s3_requests"])
    print()
    n = one["timed_jobs"]
    print(f"S3 requests per job (moto's log, the 1-worker timed jobs): {sum(s3.values()) / n:.1f} "
          f"({', '.join(f'{k} {v / n:.1f}' for k, v in s3.most_common())})")
    print()
    for p in phases:
        timed, idle = Counter(p["redis_timed"]), Counter(p["redis_idle"])
        n = p["timed_jobs"]
        per_job = ", ".join(f"{k} {v / n:.1f}" for k, v in timed.most_common())
        print(f"Redis db {REDIS_DB}, {p['workers']} worker(s): {p['redis_sends'] / n:.2f} messages sent to "
              f"'train' per job (LPUSH); {sum(timed.values()) / n:.1f} commands per job over the timed "
              f"window ({p['timed_window_s']:.1f} s: {per_job}); idle: "
              f"{p['redis_idle_per_s'] or 0:.2f} commands/s ({', '.join(f'{k} {v}' for k, v in idle.most_common())} "
              f"in {args.idle_seconds:g} s)")

    runs = inproc["runs"]
    if len(runs) == 2:
        a, b = (per_path(r) for r in runs)
        de = runs[1]["epochs"] - runs[0]["epochs"]
        print()
        print(f"SQL statements by code path, the same recipe run in this process (heartbeat "
              f"{inproc['heartbeat_s']} s), {runs[0]['epochs']} vs {runs[1]['epochs']} epochs "
              f"({runs[0]['s']:.1f} s vs {runs[1]['s']:.1f} s):")
        print()
        print("| code path | statements (run 1) | statements (run 2) | writes run 1 / run 2 | commits run 1 / run 2 | "
              "per unit |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for path in sorted(set(a) | set(b)):
            ca, cb = a.get(path, Counter()), b.get(path, Counter())
            sa = sum(v for k, v in ca.items() if k != "COMMIT")
            sb = sum(v for k, v in cb.items() if k != "COMMIT")
            unit = ""
            if path.startswith("epoch"):
                kinds = ", ".join(f"{k} {(cb[k] - ca[k]) / de:g}" for k in cb if k != "COMMIT")
                unit = (f"per epoch: {(sb - sa) / de:g} statements ({kinds}), {(writes(cb) - writes(ca)) / de:g} "
                        f"writes, {(cb['COMMIT'] - ca['COMMIT']) / de:g} commit")
            elif path == "heartbeat" and cb["COMMIT"]:
                unit = f"per beat: {writes(cb) / cb['COMMIT']:.1f} write, 1 commit ({cb['COMMIT']} beats in run 2)"
            elif path == "cancellation poll":
                unit = f"{sb / runs[1]['s']:.2f} reads/s of running job (run 2)"
            print(f"| {path} | {sa} | {sb} | {writes(ca)} / {writes(cb)} | {ca['COMMIT']} / {cb['COMMIT']} | {unit} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"phases": phases, "fetches": fetches, "inprocess": inproc}, default=str))


# --- main ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8, help="timed jobs per phase")
    ap.add_argument("--rounds", type=int, default=3, help="timed batches of --jobs per phase (the median is shown)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each small job")
    ap.add_argument("--workers", default="1,2", help="worker counts, one phase each (the first is the baseline)")
    ap.add_argument("--images", type=int, default=500, help="images of the dataset whose fetch is timed")
    ap.add_argument("--threads", default="1,16", help="ZOOFIT_S3_TRANSFER_THREADS values for the dataset fetch")
    ap.add_argument("--repeats", type=int, default=2, help="each fetch is timed this often (median)")
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="Redis commands of idle workers counted this long")
    ap.add_argument("--big-model", action=argparse.BooleanOptionalAction, default=True,
                    help="train a tf_efficientnet_lite0 job for a real-sized model and checkpoint to fetch")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    started = time.monotonic()

    from tests.utils.data import TINY_JOB, animals_zip
    from tests.utils.s3 import PREFIX, drop_bucket, moto_server, new_bucket, s3_env

    recipe = {**TINY_JOB, "epochs": args.epochs}
    n_workers = [int(x) for x in args.workers.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    say(f"start; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="zoofit-bench-scaling-") as tmp:
        root = Path(tmp)
        with moto_server(root / "moto.log") as endpoint, pg_database() as db_url, redis_db() as broker:
            bucket = new_bucket(endpoint)
            try:
                shared = {
                    **s3_env(endpoint, bucket),
                    "ZOOFIT_DATABASE_URL": db_url,
                    "ZOOFIT_BROKER_URL": broker,
                    "ZOOFIT_TENANT_MAX_RUNNING_JOBS": "16",  # fairness slots are not what is measured
                    "ZOOFIT_TENANT_MAX_QUEUED_JOBS": "64",
                    "ZOOFIT_LOG_FORMAT": "text",
                }
                settings = api_settings({**shared, "ZOOFIT_DATA_DIR": str(root / "api"),
                                         "ZOOFIT_DATABASE_URL": with_app_name(db_url, "bench-api"),
                                         "ZOOFIT_SCRATCH_DIR": str(root / "api" / "scratch"),
                                         "ZOOFIT_TORCH_THREADS": "1"})
                monitor = RedisMonitor()
                with api_client(settings) as client:
                    small_id, _ = upload(client, "animals.zip", animals_zip(6, 3))
                    photos = photo_zip(args.images)
                    big_ds_id, args.upload_s = upload(client, "photos.zip", photos)
                    args.upload_bytes = len(photos)
                    say(f"datasets uploaded (photos: {len(photos) / MB:.1f} MB in {args.upload_s:.1f} s)")

                    phases: list[dict[str, Any]] = []
                    model_key = ckpt_key = None
                    for w in n_workers:
                        from service.db import get_engine

                        get_engine(settings).dispose()
                        time.sleep(1.0)
                        before = pg_counters(db_url)
                        result, workers = throughput_phase(w, root, shared, client, settings, small_id, recipe,
                                                           args.jobs, args.rounds, monitor, args.idle_seconds,
                                                           root / "moto.log")
                        say(f"{w} worker(s): {args.jobs} jobs in {result['wall_s']:.1f} s (median of {args.rounds})")
                        try:
                            if args.big_model and w == n_workers[-1]:
                                say("a tf_efficientnet_lite0 job for a real-sized model and checkpoint")
                                job_id = submit(client, small_id, BIG_JOB)
                                stop, got = threading.Event(), []
                                grab = threading.Thread(target=capture_checkpoint,
                                                        args=(endpoint, bucket, PREFIX, job_id, stop, got), daemon=True)
                                grab.start()
                                rows = wait_done(db_url, [job_id], 400)
                                stop.set()
                                grab.join(10)
                                with session_scope(settings) as s:
                                    model_key = s.scalar(select(ModelRow.store_key).where(
                                        ModelRow.id == rows[job_id].model_id))
                                ckpt_key = got[0] if got else None
                                result["all_jobs"] += 1
                        finally:
                            close_phase(result, workers, settings, before)
                        phases.append(result)
                    monitor.stop()

                    if model_key is None:  # the small jobs' model
                        with session_scope(settings) as s:
                            model_key = s.scalar(select(ModelRow.store_key).limit(1))
                    with session_scope(settings) as s:
                        ds_key = s.scalar(select(DatasetRow.store_key).where(DatasetRow.id == big_ds_id))
                    say("fetch figures")
                    assert ds_key is not None
                    fetches = fetch_figures(settings, root / "fetch", ds_key, model_key, ckpt_key, threads,
                                            args.repeats)

                    say("statements per code path, in this process")
                    inproc = inprocess_jobs(client, settings, small_id, recipe, [args.epochs, args.epochs + 4])
            finally:
                drop_bucket(endpoint, bucket)
    report(args, phases, fetches, inproc, time.monotonic() - started)


if __name__ == "__main__":
    main()
