"""A worker's hold on a job: the attempt it claimed, a heartbeat, and writes fenced by both.

``claim_job`` returns the attempt number it wrote; that number is the fencing token. Every
write the worker makes afterwards is an UPDATE ``WHERE id = job AND attempts = attempt AND
status = 'running'``. Another worker can take a job over only once its heartbeat is stale (its
worker froze, lost the database, or died), and taking it over bumps ``attempts``: from then on
every write of the old worker matches no row. The old worker then raises ``JobLost``, unwinds
and writes nothing more: no history, no outcome, no model, and it leaves the checkpoint folder,
which belongs to the new owner now.

The heartbeat is a daemon thread that touches ``heartbeat_at`` every ``worker_heartbeat_s`` for
the whole life of the job (decoding the dataset included, where no training hook runs), so a
live worker's job never looks stale. A beat that matches no row marks the lease lost: the next
fenced write or ``check`` raises, at the latest at the next ``should_stop`` poll.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any, NoReturn

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import JobRow, JobStatus, rowcount, session_scope, utcnow

log = logging.getLogger("zoofit.worker")


class JobLost(Exception):
    """Another worker holds the job now: this one must stop and write nothing more."""


class Lease:
    """Attempt ``attempt`` of job ``job_id``, held by this worker; a context manager runs its heartbeat."""

    def __init__(self, job_id: str, attempt: int, settings: Settings, worker: str = "local") -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.settings = settings
        self.worker = worker  # the node name that holds it
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def holds(self, job: JobRow | None) -> bool:
        """Whether ``job`` (as just read) is still this attempt's."""
        return job is not None and job.attempts == self.attempt and job.status == JobStatus.RUNNING

    def check(self) -> None:
        """Raise ``JobLost`` if a write or a beat has found the job taken over."""
        if self._lost.is_set():
            self.lose()

    def lose(self) -> NoReturn:
        """Note that the job is no longer ours, and raise ``JobLost``."""
        self._lost.set()
        raise JobLost(f"job {self.job_id}: attempt {self.attempt} was taken over by another worker")

    def update(self, session: Session, **values: Any) -> None:
        """A fenced UPDATE of the job in ``session``; raises ``JobLost`` if it is not ours any more."""
        self.check()
        res = session.execute(
            update(JobRow)
            .where(JobRow.id == self.job_id, JobRow.attempts == self.attempt, JobRow.status == JobStatus.RUNNING)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if not rowcount(res):
            self.lose()

    def write(self, **values: Any) -> None:
        """``update`` in a transaction of its own."""
        with session_scope(self.settings) as s:
            self.update(s, **values)

    def beat(self) -> None:
        """Touch the heartbeat. Never raises: a database hiccup is retried at the next beat."""
        try:
            self.write(heartbeat_at=utcnow())
        except JobLost:
            log.warning("job %s: another worker took it over; stopping attempt %d", self.job_id, self.attempt)
        except Exception as exc:
            log.warning("job %s: heartbeat failed (%s); trying again in %.0f s",
                        self.job_id, exc, self.settings.worker_heartbeat_s)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_s) and not self.lost:
            self.beat()

    def start(self) -> None:
        """Beat every ``worker_heartbeat_s`` in a daemon thread until ``stop``."""
        self._thread = threading.Thread(
            target=self._beat_until_stopped, name=f"zoofit-heartbeat-{self.job_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Lease:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
