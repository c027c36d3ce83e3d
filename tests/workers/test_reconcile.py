from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from service.db import JobRow, JobStatus, session_scope, utcnow
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
