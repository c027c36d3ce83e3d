"""Database load of job event streams: 1 vs 50 watchers of one job.

    .venv/bin/python benchmarks/bench_events.py [--watchers 50] [--seconds 10] [--rate 5]

Runs the API with uvicorn in this process (a temporary SQLite data dir, auth on) and, for each
phase, a job whose events a writer thread appends through ``service.events.append_event`` at
``--rate`` events/s on an engine of its own (as a worker process would). ``--watchers`` clients
(httpx + httpx-sse) stream the job. The SQL statements the API's engine runs are counted
(``before_cursor_execute``) over the steady state, after every watcher has connected. Each phase
ends with the job's ``done``; every watcher must have got every event of the job, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.auth import create_key  # noqa: E402
from service.config import Settings, get_settings  # noqa: E402
from service.db import JobRow, get_engine, make_engine, new_id, session_scope  # noqa: E402
from service.events import append_event, append_status, read_events  # noqa: E402


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *_args: Any) -> None:
        self.n += 1


def _serve(app: Any) -> tuple[str, Any, threading.Thread]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def _writer(settings: Settings, job_id: str, rate: float, stop: threading.Event) -> None:
    """A worker's appends, on an engine of its own (not counted), then the job's end."""
    engine = make_engine(settings.resolved_database_url)
    sessions = sessionmaker(bind=engine)
    i = 0
    while not stop.wait(1 / rate):
        with sessions.begin() as s:
            append_event(s, job_id, "stage", {"stage": "training", "step": i})
        i += 1
    with sessions.begin() as s:
        append_status(s, job_id, "succeeded", 1, model_id="bench")
    engine.dispose()


async def _watch(client: httpx.AsyncClient, job_id: str, got: list[int], connected: asyncio.Event) -> None:
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        source.response.raise_for_status()
        async for e in source.aiter_sse():
            got.append(int(e.id))
            connected.set()
            if e.event == "done":
                return


async def _phase(url: str, key: str, settings: Settings, watchers: int, seconds: float, rate: float,
                 count: Counter) -> dict[str, Any]:
    job_id = new_id()
    with session_scope(settings) as s:
        s.add(JobRow(id=job_id, tenant="bench", dataset_id="d", spec={}, progress={}, history=[]))
        append_status(s, job_id, "running", 1)
    stop = threading.Event()
    writer = threading.Thread(target=_writer, args=(settings, job_id, rate, stop), daemon=True)
    writer.start()
    limits = httpx.Limits(max_connections=watchers + 5)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=limits) as client:
        opened_n = count.n
        got: list[list[int]] = [[] for _ in range(watchers)]
        flags = [asyncio.Event() for _ in range(watchers)]
        tasks = [asyncio.create_task(_watch(client, job_id, got[i], flags[i])) for i in range(watchers)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 60)
        await asyncio.sleep(1.0)  # let the connection set-up (key checks, replays) pass
        start_n, t0 = count.n, time.perf_counter()
        connect = start_n - opened_n  # key checks, job lookups, replays, plus 1 s of polling
        await asyncio.sleep(seconds)
        queries, elapsed = count.n - start_n, time.perf_counter() - t0
        stop.set()
        await asyncio.to_thread(writer.join)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    expected = [e.id for e in read_events(settings, job_id, 0)]
    complete = sum(g == expected for g in got)
    return {"watchers": watchers, "queries": queries, "qps": queries / elapsed, "events": len(expected),
            "complete": complete, "connect": connect}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=5.0, help="events appended per second")
    args = parser.parse_args()

    from service.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), events_max_streams_per_tenant=max(100, args.watchers))
        settings.ensure_dirs()
        with session_scope(settings) as s:
            key = create_key(s, "bench")[1]
        app = create_app(settings)
        app.dependency_overrides[get_settings] = lambda: settings
        count = Counter()
        event.listen(get_engine(settings), "before_cursor_execute", count)  # the API's engine only
        url, server, thread = _serve(app)
        try:
            results = [asyncio.run(_phase(url, key, settings, n, args.seconds, args.rate, count))
                       for n in (1, args.watchers)]
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    print(f"poll interval {settings.events_poll_s} s, writer {args.rate:g} events/s, {args.seconds:g} s measured")
    for r in results:
        print(f"{r['watchers']:>3} watcher(s): {r['qps']:.2f} DB queries/s ({r['queries']} statements); "
              f"{r['complete']}/{r['watchers']} got all {r['events']} events in order; "
              f"{r['connect']} statements to connect them (and 1 s of polls)")
    one, many = results
    print(f"ratio {args.watchers} vs 1 watchers: {many['qps'] / one['qps']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
