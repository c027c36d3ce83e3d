"""Find jobs whose worker died and put them back on the queue.

A worker killed outright (SIGKILL, OOM, power loss) leaves its job ``running`` with a heartbeat
that stops moving. Its broker message would only come back after the broker's visibility
timeout, so every worker also runs this check at start-up and then periodically: a running job
whose heartbeat is older than three heartbeat periods goes back to ``queued`` and onto the queue.
A late duplicate message is harmless: ``claim_job`` only takes a queued job (or a stale one),
and a job re-queued ``job_max_attempts`` times fails there instead of starting again.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update

from service import unpublished
from service.admission import admit
from service.config import Settings
from service.db import JobRow, JobStatus, rowcount, session_scope, utcnow
from service.events import STAGE, append_event, append_status
from service.queue import broker_backlog, job_device, queue_for

log = logging.getLogger("zoofit.reconcile")

# Why a job was re-queued: kept in its progress, named if the job gives up (``claim_job``).
WORKER_STOPPED = "its worker stopped (stale heartbeat)"


def heartbeat_cutoff(settings: Settings) -> datetime:
    """A running job whose heartbeat is older than this (three heartbeat periods) has lost its worker."""
    return utcnow() - timedelta(seconds=3 * settings.worker_heartbeat_s)


def stale_jobs(settings: Settings) -> list[str]:
    cutoff = heartbeat_cutoff(settings)
    with session_scope(settings) as s:
        return list(
            s.scalars(
                select(JobRow.id).where(
                    JobRow.status == JobStatus.RUNNING,
                    JobRow.heartbeat_at < cutoff,
                )
            )
        )


def claim_resend(settings: Settings, job_id: str, cutoff: datetime) -> bool:
    """Take the re-send of a waiting job: True for exactly one of several reconcilers (compare and set
    on ``enqueued_at``, which the winner moves past ``cutoff``)."""
    with session_scope(settings) as s:
        res = s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status == JobStatus.QUEUED, JobRow.enqueued_at < cutoff)
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return bool(rowcount(res))


def _lost_messages(backlog: Callable[[str], int | None], settings: Settings, queue: str) -> int | None:
    """How many of the jobs sent to ``queue`` and not started have no message left in it; None:
    unknown (the transport cannot say), so any may be lost (a duplicate message is harmless).

    Counted per train queue: a cuda job waiting for a GPU host keeps its message in ``train-cuda``,
    which says nothing about a message lost from ``train``.
    """
    held = backlog(queue)
    if held is None:
        return None
    with session_scope(settings) as s:
        devices = s.scalars(
            select(job_device()).where(JobRow.status == JobStatus.QUEUED, JobRow.enqueued_at.is_not(None))
        )
        sent = Counter(queue_for(d) for d in devices)[queue]
    return max(0, sent - held)


def _send(enqueue: Callable[[str], None], job_id: str) -> bool:
    # One broker hiccup must not end the pass (the other jobs and the admission after them).
    try:
        enqueue(job_id)
    except Exception:
        log.exception("could not send job %s; the next pass tries again", job_id)
        return False
    return True


def reconcile(
    settings: Settings, enqueue: Callable[[str], None], backlog: Callable[[str], int | None] = lambda _queue: None
) -> list[str]:
    """Re-enqueue lost work and admit waiting jobs to free slots. Returns the ids sent.

    - a running job with a stale heartbeat goes back to ``queued`` and onto the queue;
    - a queued job whose message went out more than ``requeue_after_s`` ago is sent again when
      its train queue holds fewer messages (``backlog(queue)``) than jobs sent to it and not
      started: the broker may have lost them (a Redis restart without persistence), or it still
      holds them all and nothing is re-sent. Of several reconcilers, one re-sends a job
      (``claim_resend``); a duplicate message would be harmless anyway: ``claim_job`` lets only
      one worker run the job;
    - a queued job never sent (``enqueued_at`` NULL) waits for a slot of its tenant and is not
      lost: ``admit`` sends it once one is free (a job's end that nobody followed up).
    """
    requeued = []
    waiting_cutoff = utcnow() - timedelta(seconds=settings.requeue_after_s)
    with session_scope(settings) as s:
        waiting = [
            (job_id, queue_for(device))
            for job_id, device in s.execute(
                select(JobRow.id, job_device())
                .where(
                    JobRow.status == JobStatus.QUEUED,
                    JobRow.cancel_requested.is_(False),
                    JobRow.enqueued_at < waiting_cutoff,
                )
                .order_by(JobRow.enqueued_at)
            )
        ]
    resend: set[str] = set()
    for queue in dict.fromkeys(q for _, q in waiting):
        ids = [job_id for job_id, q in waiting if q == queue]
        lost = _lost_messages(backlog, settings, queue)
        resend.update(ids if lost is None else ids[:lost])  # the oldest; the broker holds the others' messages
    for job_id in (job_id for job_id, _ in waiting if job_id in resend):
        if claim_resend(settings, job_id, waiting_cutoff):
            log.warning("job %s waited over %.0f s in the queue; sending it again", job_id, settings.requeue_after_s)
            if _send(enqueue, job_id):
                requeued.append(job_id)
    cutoff = heartbeat_cutoff(settings)
    for job_id in stale_jobs(settings):
        progress = {"stage": "re-queued after its worker stopped", "cause": WORKER_STOPPED}
        with session_scope(settings) as s:
            # Guarded: only if it is still running and still stale (no worker came back to it).
            stale = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.RUNNING, JobRow.heartbeat_at < cutoff)
                .values(status=JobStatus.QUEUED, enqueued_at=utcnow(), progress=progress)
                .returning(JobRow.attempts)
                .execution_options(synchronize_session=False)
            ).all()
            for (attempt,) in stale:
                append_status(s, job_id, JobStatus.QUEUED, attempt, cause=WORKER_STOPPED)
                append_event(s, job_id, STAGE, progress)
        if stale:
            log.warning("job %s had a stale heartbeat (its worker died?); re-queued", job_id)
            if _send(enqueue, job_id):  # else it is queued and sent again after requeue_after_s
                requeued.append(job_id)
    return requeued + admit(settings, enqueue)


def reconcile_pass(settings: Settings, enqueue: Callable[[str], None]) -> None:
    """One pass of the periodic work: re-send lost jobs, then sweep unpublished uploads; one failing
    (the broker away, the store away) does not keep the other from running."""
    try:
        reconcile(settings, enqueue, broker_backlog)
    except Exception:
        log.exception("reconcile pass failed")
    try:
        unpublished.sweep(settings)
    except Exception:
        log.exception("sweep of unpublished uploads failed")


def start_reconciler(settings: Settings, enqueue: Callable[[str], None]) -> threading.Event:
    """Run ``reconcile`` now and then every heartbeat period in a daemon thread; set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            reconcile_pass(settings, enqueue)
            if stop.wait(min(settings.worker_heartbeat_s, settings.requeue_after_s)):
                return

    threading.Thread(target=loop, name="zoofit-reconciler", daemon=True).start()
    return stop
