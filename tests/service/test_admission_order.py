"""Admission sends a tenant's waiting jobs oldest first, whatever order the database returns updated rows in."""

from __future__ import annotations

from datetime import timedelta

import pytest

from service.admission import admit
from service.db import JobRow, session_scope, utcnow

STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.mark.parametrize("store", STORES)
def test_admit_sends_the_oldest_waiting_jobs_first(store: str, make_settings, request) -> None:
    url = {"database_url": request.getfixturevalue("pg_url")} if store == "postgresql" else {}
    settings = make_settings(tenant_max_running_jobs="3", **url)
    # Oldest first by created_at, but stored newest first with ids sorting newest first too: an
    # UPDATE … RETURNING that walks the table or its primary key answers newest first.
    ids = [f"job{9 - i}" for i in range(5)]
    t0 = utcnow() - timedelta(hours=1)
    with session_scope(settings) as s:
        for i in reversed(range(len(ids))):
            s.add(JobRow(id=ids[i], tenant="alice", dataset_id="d", spec={}, progress={}, history=[],
                         created_at=t0 + timedelta(seconds=i)))
            s.flush()
    sent: list[str] = []
    assert admit(settings, sent.append) == sent == ids[:3]
