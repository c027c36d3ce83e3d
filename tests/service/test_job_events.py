"""Job event streams: the hub's fan-out (replay, live, limits) and GET /v1/jobs/{id}/events."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse
from sqlalchemy import event

from service.config import Settings
from service.db import JobRow, get_engine, new_id, session_scope
from service.errors import TooManyRequests, Unavailable
from service.event_hub import STREAM_RETRY_AFTER_S, EventHub, Subscription
from service.events import append_event, append_status, read_events
from tests.conftest import api_client
from tests.utils.events import stream_events
from tests.utils.server import serve


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(events_poll_s="0.05")


def new_job(settings: Settings, tenant: str = "alice") -> str:
    job_id = new_id()
    with session_scope(settings) as s:
        s.add(JobRow(id=job_id, tenant=tenant, dataset_id="d", spec={}, progress={}, history=[]))
    return job_id


def emit(settings: Settings, job_id: str, n: int = 1, type_: str = "stage") -> None:
    """Append ``n`` events as a worker would, each in its own transaction."""
    for i in range(n):
        with session_scope(settings) as s:
            append_event(s, job_id, type_, {"stage": f"step {i}"})


def finish(settings: Settings, job_id: str) -> None:
    with session_scope(settings) as s:
        append_status(s, job_id, "succeeded", 1, model_id="m1")


class QueryCount:
    """SELECTs on job_events that the engine runs (the writer's INSERTs are not counted)."""

    def __init__(self, settings: Settings) -> None:
        self.n = 0
        self.engine = get_engine(settings)
        event.listen(self.engine, "before_cursor_execute", self._count)

    def _count(self, _conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "job_events" in statement:
            self.n += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._count)


async def collect(sub: Subscription, until: int, timeout: float = 10.0) -> list[int]:
    """The ids a subscriber gets (replay, then live) up to event ``until``."""
    ids = [e.id for e in sub.replayed()]

    async def live() -> None:
        async for e in sub.live():
            ids.append(e.id)
            if e.id >= until:
                return

    if sub.last < until:
        await asyncio.wait_for(live(), timeout)
    return ids


def all_ids(settings: Settings, job_id: str) -> list[int]:
    return [e.id for e in read_events(settings, job_id, 0)]


# --------------------------------------------------------------------------- the hub


def test_replay_and_live_meet_without_gap_or_duplicate(settings):
    """Subscribers join while a writer appends: each gets every later event exactly once, in order."""
    job_id = new_job(settings)
    emit(settings, job_id, 5)

    def slow_replay(settings: Settings, job_id: str, after: int, limit: int | None) -> list:
        events = read_events(settings, job_id, after, limit)
        if limit is None:  # a replay: events keep coming (and being polled) before it is handed over
            time.sleep(0.15)
        return events

    async def main() -> list[tuple[int, list[int]]]:
        hub = EventHub(settings, read=slow_replay)
        writer = threading.Thread(target=emit, args=(settings, job_id, 80))
        writer.start()
        subs = []
        for i in range(12):  # one joins every few events, from the start or after some event
            after = all_ids(settings, job_id)[-1 - i % 3] if i % 2 else 0
            subs.append((after, await hub.open(job_id, "alice", after)))
            await asyncio.sleep(0.02)
        await asyncio.to_thread(writer.join)
        last = all_ids(settings, job_id)[-1]
        got = [(after, await collect(sub, last)) for after, sub in subs]
        for _, sub in subs:
            hub.close(sub)
        assert hub.watched() == [] and hub.streams == 0
        return got

    results = asyncio.run(main())
    ids = all_ids(settings, job_id)
    assert len(ids) == 85
    for after, got in results:
        assert got == [i for i in ids if i > after]


def test_a_last_event_id_beyond_the_jobs_newest_still_gets_its_events_and_done(settings):
    """An id from elsewhere (another database, a wiped data dir, a bogus header) must not hide the job's events."""
    job_id = new_job(settings)
    emit(settings, job_id, 2)
    before = all_ids(settings, job_id)

    async def main() -> list[str]:
        hub = EventHub(settings)
        sub = await hub.open(job_id, "alice", 10**12)
        assert sub.replayed() == []
        await asyncio.to_thread(emit, settings, job_id, 1)
        await asyncio.to_thread(finish, settings, job_id)
        got: list[str] = []

        async def live() -> None:
            async for e in sub.live():
                got.append(e.type)
                if e.type == "done":
                    return

        await asyncio.wait_for(live(), 5)
        hub.close(sub)
        return got

    assert asyncio.run(main()) == ["stage", "status", "done"]
    assert all_ids(settings, job_id)[:2] == before


def test_fifty_subscribers_share_one_query_per_interval(settings):
    job_id = new_job(settings)
    emit(settings, job_id, 3)

    async def polls_in(watchers: int, seconds: float) -> int:
        hub = EventHub(settings)
        subs = [await hub.open(job_id, "alice", 0) for _ in range(watchers)]
        count = QueryCount(settings)
        await asyncio.sleep(seconds)
        count.close()
        for sub in subs:
            hub.close(sub)
        return count.n

    one, fifty = asyncio.run(polls_in(1, 1.0)), asyncio.run(polls_in(50, 1.0))
    intervals = 1.0 / settings.events_poll_s
    assert 0.5 * intervals <= one <= intervals + 2
    assert fifty <= intervals + 2, f"50 watchers made {fifty} queries in {intervals:.0f} poll intervals"


def test_a_subscriber_that_falls_behind_is_dropped_and_others_go_on(make_settings):
    settings = make_settings(events_poll_s="0.05", events_queue_max="5")
    job_id = new_job(settings)

    async def main() -> None:
        hub = EventHub(settings)
        slow = await hub.open(job_id, "alice", 0)
        fast = await hub.open(job_id, "alice", 0)
        got: list[int] = []

        async def read_fast() -> None:
            async for e in fast.live():
                got.append(e.id)
                if len(got) == 20:
                    return

        reader = asyncio.create_task(read_fast())
        for _ in range(20):
            await asyncio.to_thread(emit, settings, job_id)
            await asyncio.sleep(0.01)
        await asyncio.wait_for(reader, 10)
        assert slow.dropped and [e async for e in slow.live()] == []  # its feed ended, nothing piled up
        assert len(got) == 20 and not fast.dropped
        hub.close(slow)
        assert hub.watched() == [job_id]
        hub.close(fast)
        assert hub.watched() == [] and hub.streams == 0

    asyncio.run(main())


def test_the_poller_stops_with_the_last_subscriber(settings):
    job_id = new_job(settings)

    async def main() -> None:
        hub = EventHub(settings)
        a, b = await hub.open(job_id, "alice", 0), await hub.open(job_id, "alice", 0)
        task = hub._feeds[job_id].task
        hub.close(a)
        hub.close(a)  # idempotent
        assert hub.watched() == [job_id] and hub.streams == 1
        hub.close(b)
        await asyncio.sleep(0)
        assert hub.watched() == [] and hub.streams == 0 and task is not None and task.cancelled()
        polls = hub.polls
        await asyncio.sleep(0.2)
        assert hub.polls == polls

    asyncio.run(main())


def test_a_database_outage_backs_the_pollers_off_and_logs_little(settings, caplog):
    jobs = [new_job(settings) for _ in range(3)]
    down = threading.Event()

    def read(settings: Settings, job_id: str, after: int, limit: int | None) -> list:
        if down.is_set():
            raise OSError("connection refused")
        return read_events(settings, job_id, after, limit)

    async def main() -> int:
        hub = EventHub(settings, read=read)
        subs = [await hub.open(job_id, "alice", 0) for job_id in jobs]
        down.set()
        polls = hub.polls
        await asyncio.sleep(1.5)
        polls = hub.polls - polls
        down.clear()
        emit(settings, jobs[0])
        got = await collect(subs[0], all_ids(settings, jobs[0])[-1], timeout=10)  # back once it is
        assert len(got) == 1
        tasks = [feed.task for feed in hub._feeds.values()]
        await hub.aclose()
        assert all(t is not None and t.done() for t in tasks)  # awaited, not just told to stop
        return polls

    with caplog.at_level("WARNING", logger="zoofit.events"):
        polls = asyncio.run(main())
    # Without backoff: 3 jobs x 1.5 s / 0.05 s = 90 polls, and as many warnings.
    assert polls <= 3 * 7, polls
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) <= 3


def test_stream_limits_per_tenant_and_per_process(make_settings):
    settings = make_settings(events_max_streams="3", events_max_streams_per_tenant="2")
    job_id = new_job(settings)

    async def main() -> None:
        hub = EventHub(settings)
        subs = [await hub.open(job_id, "alice", 0), await hub.open(job_id, "alice", 0)]
        with pytest.raises(TooManyRequests):
            await hub.open(job_id, "alice", 0)
        subs.append(await hub.open(job_id, "bob", 0))
        with pytest.raises(Unavailable):
            await hub.open(job_id, "carol", 0)
        hub.close(subs.pop(0))
        subs.append(await hub.open(job_id, "alice", 0))  # a slot freed
        for sub in subs:
            hub.close(sub)
        assert hub.streams == 0

    asyncio.run(main())


# --------------------------------------------------------------------------- the route


def test_events_need_a_key(settings):
    job_id = new_job(settings)
    with api_client(settings, tenant=None) as anonymous:
        r = anonymous.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 401


def test_another_tenants_job_is_404(settings):
    job_id = new_job(settings, tenant="bob")
    with api_client(settings, "alice") as alice:
        r = alice.get(f"/v1/jobs/{job_id}/events")
        assert r.status_code == 404 and job_id in r.json()["detail"]
        assert alice.app.state.events.streams == 0


def test_a_cancelled_job_streams_its_events_and_done_closes_the_stream(client, enqueued):
    from tests.utils.workers import submit

    job_id = submit(client)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    events = stream_events(client, job_id)  # returns: the server closed the stream after ``done``
    assert [(t, d.get("status", d.get("stage"))) for _, t, d in events] == [
        ("status", "queued"), ("stage", "queued"), ("stage", "cancelled"), ("status", "cancelled"),
        ("done", "cancelled"),
    ]
    assert events[0][2] == {"status": "queued", "attempt": 0, "error": None, "model_id": None}
    assert events[-1][2] == {"status": "cancelled", "model_id": None, "error": None, "metrics": None}
    assert stream_events(client, job_id, last_event_id=events[1][0]) == events[2:]
    assert client.app.state.events.streams == 0 and client.app.state.events.watched() == []


def test_live_events_reach_a_client_and_disconnect_cleans_up(make_settings):
    settings = make_settings(events_poll_s="0.05", events_max_streams_per_tenant="1")
    job_id = new_job(settings)
    emit(settings, job_id, 2)
    with api_client(settings, "alice") as c:
        app = c.app
        hub: EventHub = app.state.events
        headers = dict(c.headers)
    with serve(app) as url, httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            events = source.iter_sse()
            assert [next(events).data for _ in range(2)] == [json.dumps({"stage": f"step {i}"}, separators=(",", ":"))
                                                            for i in range(2)]
            threading.Thread(target=emit, args=(settings, job_id, 1)).start()
            live = next(events)
            assert live.event == "stage" and int(live.id) > 0
            assert hub.watched() == [job_id] and hub.streams == 1
            refused = http.get(f"/v1/jobs/{job_id}/events")
            assert refused.status_code == 429  # one stream per tenant here
            assert refused.headers["Retry-After"] == str(STREAM_RETRY_AFTER_S)
        # The client went away mid-stream: the server notices and lets go of the stream and its poller.
        deadline = time.monotonic() + 10
        while (hub.streams or hub.watched()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.streams == 0 and hub.watched() == []

        # A live stream ends with ``done``.
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events",
                         headers={"Last-Event-ID": live.id}) as source:
            threading.Timer(0.2, finish, args=(settings, job_id)).start()
            tail = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
        assert tail == [("status", {"status": "succeeded", "attempt": 1, "error": None, "model_id": "m1"}),
                        ("done", {"status": "succeeded", "model_id": "m1", "error": None, "metrics": None})]


def test_a_stream_response_never_sent_holds_no_subscription(settings):
    """The subscription is opened by the response as it is sent: an answer that never goes out leaks nothing."""
    from service.api.routes.jobs import job_events

    job_id = new_job(settings)

    async def main() -> None:
        hub = EventHub(settings)
        response = await job_events(job_id, settings, "alice", hub, None)
        assert hub.streams == 0 and hub.watched() == []
        del response

    asyncio.run(main())


def test_pings_keep_an_idle_stream_open(make_settings):
    settings = make_settings(events_ping_s="0.2")
    job_id = new_job(settings)
    with api_client(settings, "alice") as c:
        app, headers = c.app, dict(c.headers)
    with serve(app) as url, httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            lines = r.iter_lines()
            assert next(lines) == ": ping"




def test_many_streams_open_at_once_without_exhausting_the_pool(settings):
    """30 streams opening together (the pool holds 15 connections): none waits on a connection."""
    job_id = new_job(settings)
    emit(settings, job_id, 1)
    finish(settings, job_id)
    with api_client(settings, "alice") as c:
        app, headers = c.app, dict(c.headers)

    async def watch(http: httpx.AsyncClient) -> list[str]:
        async with aconnect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            return [e.event async for e in source.aiter_sse()]

    async def main(url: str) -> list[list[str]]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20,
                                     limits=httpx.Limits(max_connections=40)) as http:
            return await asyncio.wait_for(asyncio.gather(*(watch(http) for _ in range(30))), 20)

    with serve(app) as url:
        t0 = time.monotonic()
        streams = asyncio.run(main(url))
    assert streams == [["stage", "status", "done"]] * 30
    assert time.monotonic() - t0 < 15
