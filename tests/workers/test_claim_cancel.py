"""A cancelled job delivered twice: one claim cancels it, the other finds it done (one status/done pair)."""

from __future__ import annotations

from sqlalchemy import event

from service.db import JobRow, JobStatus, get_engine, new_id, session_scope
from service.events import read_events
from workers.jobs import claim_job


def test_two_claims_of_a_cancel_requested_job_cancel_it_once(settings) -> None:
    job_id = new_id()
    with session_scope(settings) as s:
        s.add(JobRow(id=job_id, tenant="alice", dataset_id="d", spec={}, progress={}, history=[],
                     cancel_requested=True))
    engine = get_engine(settings)
    interleaved: list[int | None] = []

    def second_claim_after_first_read(_conn, _cursor, statement: str, *_args) -> None:
        # The first claim has read the job (queued, cancel requested): the duplicate delivery's
        # claim runs to the end before the first one writes anything.
        if not interleaved and statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            interleaved.append(None)
            interleaved.append(claim_job(job_id, "w2", redelivered=True, settings=settings))

    event.listen(engine, "after_cursor_execute", second_claim_after_first_read)
    try:
        assert claim_job(job_id, "w1", redelivered=False, settings=settings) is None
    finally:
        event.remove(engine, "after_cursor_execute", second_claim_after_first_read)
    assert interleaved == [None, None]
    with session_scope(settings) as s:
        assert s.get(JobRow, job_id).status == JobStatus.CANCELLED
    types = [(e.type, e.data.get("status", e.data.get("stage"))) for e in read_events(settings, job_id, 0)]
    assert types == [("stage", "cancelled"), ("status", "cancelled"), ("done", "cancelled")]
