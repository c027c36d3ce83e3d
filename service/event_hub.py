"""Fan-out of job events to the streams of one API process: one database poller per watched job.

However many clients watch a job, the process reads its new events once every ``events_poll_s``
(one indexed query, in a worker thread, on a session that lives for that query only) and hands
each event to every watcher's bounded queue. A watcher that falls ``events_queue_max`` events
behind is disconnected (its queue is emptied and closed): it reconnects with ``Last-Event-ID``
and its replay brings it up to date from the database, so memory stays bounded and nothing is lost.

A new watcher is registered with the job's feed *before* it reads its replay (everything after
its ``Last-Event-ID``, one query): an event committed meanwhile is in the replay, in the live feed,
or in both, and ``Subscription.live`` skips ids it already gave. The feed's own starting point
(the job's newest id) is read before the first replay for the same reason. The poller stops when
the job's last watcher leaves.

Streams are counted per process and per tenant (``events_max_streams``: 503,
``events_max_streams_per_tenant``: 429): an open stream costs a socket, an idle coroutine and
a queue of at most ``events_queue_max`` small events; the database cost is per watched job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from service.config import Settings
from service.errors import TooManyRequests, Unavailable
from service.events import DONE, JobEvent, last_event_id, read_events

log = logging.getLogger("zoofit.events")

# Events read in one poll at most; a poll that gets this many polls again at once.
POLL_LIMIT = 500
# Retry-After of a 429 over the tenant's open streams: a stream closes when its job ends or its client leaves.
STREAM_RETRY_AFTER_S = 10
# While the database is away a poller waits twice as long after each failed poll, up to this.
MAX_BACKOFF_S = 10.0
# ... and the process says so in its log at most once in this many seconds (not once per job per poll).
WARN_EVERY_S = 60.0

Reader = Callable[[Settings, str, int, int | None], list[JobEvent]]
Latest = Callable[[Settings, str], int]


class Subscription:
    """One stream's view of a job: the replay it missed, then the live events, each id once."""

    def __init__(self, job_id: str, tenant: str, after: int, maxsize: int) -> None:
        self.job_id = job_id
        self.tenant = tenant
        self.last = after  # the highest id given to the client so far
        self.replay: list[JobEvent] = []
        self.dropped = False  # fell behind (or the hub closed): its live feed has ended
        self.closed = False  # given back to the hub
        self._queue: asyncio.Queue[JobEvent | None] = asyncio.Queue(maxsize)

    def offer(self, event: JobEvent) -> bool:
        """Queue a live event; False (and the feed closed) when the queue is full."""
        if self.dropped:
            return False
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.end()
            return False
        return True

    def end(self) -> None:
        """Close the live feed: what is queued is dropped, ``live`` returns."""
        self.dropped = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def replayed(self) -> list[JobEvent]:
        """The replay, each event counted as given (call once)."""
        out = [e for e in self.replay if e.id > self.last]
        if out:
            self.last = out[-1].id
        return out

    async def live(self) -> AsyncIterator[JobEvent]:
        """The events after the replay, as the poller finds them; ends once ``end`` was called."""
        while True:
            event = await self._queue.get()
            if event is None:
                return
            if event.id <= self.last and event.type != DONE:  # already in the replay
                continue
            self.last = event.id
            yield event


@dataclass
class _Feed:
    job_id: str
    start: asyncio.Future[int]  # the job's newest event id when the feed started
    subscribers: set[Subscription] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class EventHub:
    """The API process's job event pollers; lives on ``app.state.events``, used from the event loop only."""

    def __init__(self, settings: Settings, *, read: Reader = read_events, latest: Latest = last_event_id) -> None:
        self.settings = settings
        self._read = read
        self._latest = latest
        self._feeds: dict[str, _Feed] = {}
        self._tenants: Counter[str] = Counter()
        self.polls = 0  # poll queries made, for tests and benchmarks
        self._warned_at: float | None = None  # when a failed poll was last logged as a warning
        self._unlogged = 0  # failed polls since then, not logged

    @property
    def streams(self) -> int:
        return sum(self._tenants.values())

    def watched(self) -> list[str]:
        """The ids of the jobs with a poller now."""
        return list(self._feeds)

    async def open(self, job_id: str, tenant: str, after: int = 0) -> Subscription:
        """Subscribe to ``job_id`` from after event ``after``, its replay read; ``close`` it when done.

        Raises ``TooManyRequests`` / ``Unavailable`` over the stream limits, and the database's error
        if the replay cannot be read (nothing is left open then).
        """
        s = self.settings
        if self.streams >= s.events_max_streams:
            raise Unavailable(
                f"this API process serves {s.events_max_streams} event streams already "
                "(ZOOFIT_EVENTS_MAX_STREAMS); retry later")
        if self._tenants[tenant] >= s.events_max_streams_per_tenant:
            raise TooManyRequests(
                f"tenant {tenant!r} has {s.events_max_streams_per_tenant} event streams open already "
                "(ZOOFIT_EVENTS_MAX_STREAMS_PER_TENANT); close one first", retry_after=STREAM_RETRY_AFTER_S)
        sub = Subscription(job_id, tenant, after, s.events_queue_max)
        self._tenants[tenant] += 1
        feed = self._feeds.get(job_id)
        if feed is None:
            loop = asyncio.get_running_loop()
            start = asyncio.ensure_future(asyncio.to_thread(self._latest, s, job_id))
            feed = self._feeds[job_id] = _Feed(job_id, start)
            feed.task = loop.create_task(self._poll(feed), name=f"zoofit-events-{job_id}")
        feed.subscribers.add(sub)  # before the replay is read: see the module's docstring
        try:
            newest = await asyncio.shield(feed.start)
            if after > newest:
                # Maybe past the job's newest event (an id of another database, a wiped data dir,
                # a made-up header): nothing after the job's newest can have been seen, and
                # counting from there would skip the job's events, ``done`` included, for good.
                after = sub.last = min(after, await asyncio.to_thread(self._latest, s, job_id))
            sub.replay = await asyncio.to_thread(self._read, s, job_id, after, None)
        except BaseException:
            self.close(sub)
            raise
        return sub

    def close(self, sub: Subscription) -> None:
        """Unsubscribe (idempotent); the job's poller stops with its last subscriber."""
        feed = self._feeds.get(sub.job_id)
        if feed is not None:
            feed.subscribers.discard(sub)
            if not feed.subscribers:
                self._stop(feed)
        if not sub.closed:
            sub.closed = True
            self._tenants[sub.tenant] -= 1
            if self._tenants[sub.tenant] <= 0:
                del self._tenants[sub.tenant]
        if not sub.dropped:
            sub.end()

    async def aclose(self) -> None:
        """End every stream and poller (the app shuts down); returns once the pollers have stopped."""
        tasks: list[asyncio.Future[Any]] = []
        for feed in list(self._feeds.values()):
            for sub in list(feed.subscribers):
                sub.end()
            tasks += [t for t in (feed.task, feed.start) if t is not None]
            self._stop(feed)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _poll_failed(self, job_id: str, exc: Exception, retry_s: float) -> None:
        """Log a failed poll: a warning at most every ``WARN_EVERY_S`` for the whole process."""
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY_S:
            self._unlogged += 1
            log.debug("job %s: reading its events failed (%s); retrying in %.1f s", job_id, exc, retry_s)
            return
        more = f" ({self._unlogged} more failed polls since the last warning)" if self._unlogged else ""
        log.warning("job %s: reading its events failed (%s); retrying in %.1f s, backing off up to %.0f s%s",
                    job_id, exc, retry_s, MAX_BACKOFF_S, more)
        self._warned_at, self._unlogged = now, 0

    def _stop(self, feed: _Feed) -> None:
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        if feed.task is not None:
            feed.task.cancel()
        if not feed.start.done():
            feed.start.cancel()

    async def _poll(self, feed: _Feed) -> None:
        try:
            last = await asyncio.shield(feed.start)
        except Exception:
            return  # the subscribers' ``open`` raises it
        interval = self.settings.events_poll_s
        wait, failures = interval, 0
        while True:
            await asyncio.sleep(wait)
            wait = interval
            while True:
                try:
                    events = await asyncio.to_thread(self._read, self.settings, feed.job_id, last, POLL_LIMIT)
                except Exception as exc:  # the database is away: keep the streams, try again, less often
                    failures += 1
                    wait = min(MAX_BACKOFF_S, interval * 2 ** min(failures, 30))
                    self._poll_failed(feed.job_id, exc, wait)
                    break
                finally:
                    self.polls += 1
                if failures:
                    log.info("job %s: reading its events again after %d failed polls", feed.job_id, failures)
                    failures = 0
                if events:
                    last = events[-1].id
                    for sub in list(feed.subscribers):
                        if not all(sub.offer(e) for e in events):
                            log.info("job %s: a stream fell %d events behind; disconnecting it",
                                     feed.job_id, self.settings.events_queue_max)
                            feed.subscribers.discard(sub)
                if len(events) < POLL_LIMIT:
                    break
