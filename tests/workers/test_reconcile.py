from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from service.db import JobRow, JobStatus, session_scope, utcnow
from service.events import read_events
from tests.utils.data import TINY_JOB, animals_zip
from workers.jobs import claim_job
from workers.reconcile import reconcile


def _job(client) -> str:
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    return client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()["id"]


def test_stale_running_job_is_requeued_once(client, settings):
    dead, alive = _job(client), _job(client)
    assert claim_job(dead, "w-dead", redelivered=False, settings=settings)
    assert claim_job(alive, "w-alive", redelivered=False, settings=settings)
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == dead).values(heartbeat_at=utcnow() - timedelta(hours=1)))

    sent: list[str] = []
    assert reconcile(settings, sent.append) == [dead]
    assert sent == [dead]
    statuses = {j["id"]: j["status"] for j in client.get("/v1/jobs").json()["data"]}
    assert statuses == {dead: JobStatus.QUEUED, alive: JobStatus.RUNNING}
    # a second pass does not send it again: it is queued now, not running
    assert reconcile(settings, sent.append) == [] and sent == [dead]
    # and the next worker can claim it normally
    assert claim_job(dead, "w-new", redelivered=False, settings=settings)
    # Each change of status is in the job's events, with the attempt it belongs to.
    statuses = [(e.data["status"], e.data["attempt"]) for e in read_events(settings, dead, 0) if e.type == "status"]
    assert statuses == [("queued", 0), ("running", 1), ("queued", 1), ("running", 2)]


def test_queued_job_with_lost_message_is_sent_again(client, settings, enqueued):
    job_id = _job(client)
    assert enqueued == [job_id]
    sent: list[str] = []
    assert reconcile(settings, sent.append) == []  # just enqueued: leave it alone
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1)))
    assert reconcile(settings, sent.append) == [job_id]
    assert reconcile(settings, sent.append) == []  # not again until requeue_after_s passes
    client.post(f"/v1/jobs/{job_id}/cancel")
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1)))
    assert reconcile(settings, sent.append) == []  # cancelled jobs are never re-sent


def test_of_two_reconcilers_one_resends_a_waiting_job(client, settings):
    from workers.reconcile import claim_resend

    job_id = _job(client)
    cutoff = utcnow()
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1)))
    # both passes saw the job waiting too long (same cutoff); only the first takes the re-send
    assert [claim_resend(settings, job_id, cutoff), claim_resend(settings, job_id, cutoff)] == [True, False]


def test_a_job_whose_message_the_broker_still_holds_is_not_resent(client, settings, enqueued):
    job_id = _job(client)
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1)))
    sent: list[str] = []
    assert reconcile(settings, sent.append, backlog=lambda _queue: 1) == []  # its message waits in the queue
    assert reconcile(settings, sent.append, backlog=lambda _queue: 0) == [job_id]  # the broker lost it
    assert sent == [job_id]


def test_the_broker_backlog_is_read_from_the_real_queue(make_settings, redis_url):
    from service.queue import TRAIN_QUEUE, broker_backlog, enqueue_export, get_celery

    make_settings(broker_url=redis_url)
    assert broker_backlog() == 0
    for i in range(3):
        get_celery().send_task("zoofit.train_job", args=[f"job-{i}"], queue=TRAIN_QUEUE)
    assert broker_backlog() == 3
    enqueue_export("export-1")  # exports have their own queue: they never hide a lost job's message
    assert broker_backlog() == 3
