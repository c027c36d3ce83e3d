"""Log lines carry their context: a request's id and tenant (X-Request-ID), a job's id and tenant in
the worker; as JSON objects with ZOOFIT_LOG_FORMAT=json, appended to the line in text."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from service.db import JobRow, JobStatus, session_scope
from service.logs import make_handler
from tests.utils.data import TINY_JOB
from workers.jobs import run_job


@contextmanager
def _captured(log_format: str) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = make_handler(log_format, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_request_log_line_carries_its_request_id_and_tenant_as_json(client) -> None:
    with _captured("json") as stream:
        r = client.get("/v1/jobs", headers={"X-Request-ID": "req-42.a:b"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42.a:b"
    access = [line for line in _json_lines(stream) if line.get("logger") == "zoofit.access"]
    assert len(access) == 1, stream.getvalue()
    line = access[0]
    assert line["request_id"] == "req-42.a:b" and line["tenant"] == "alice"
    assert (line["method"], line["path"], line["status"], line["level"]) == ("GET", "/v1/jobs", 200, "INFO")
    assert line["duration_ms"] >= 0 and "time" in line and "GET /v1/jobs 200" in line["message"]


def test_an_unusable_incoming_request_id_is_replaced_and_every_answer_has_one(client) -> None:
    for bad in ("has spaces", "x" * 129, "new\nline", ""):
        r = client.get("/healthz", headers={"X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"]), bad
    first, second = client.get("/healthz"), client.get("/healthz")
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    # errors too, also those the API key gate answers before any route
    with _captured("json") as stream:
        r = client.get("/v1/jobs", headers={"Authorization": "Bearer nope", "X-Request-ID": "denied-1"})
    assert r.status_code == 401 and r.headers["X-Request-ID"] == "denied-1"
    (line,) = [x for x in _json_lines(stream) if x.get("logger") == "zoofit.access"]
    assert line["status"] == 401 and line["request_id"] == "denied-1" and "tenant" not in line


def test_text_lines_append_the_context(client) -> None:
    with _captured("text") as stream:
        client.get("/v1/jobs", headers={"X-Request-ID": "t-1"})
    (line,) = [x for x in stream.getvalue().splitlines() if "zoofit.access" in x]
    assert line.endswith("[request_id=t-1 tenant=alice]") and " INFO zoofit.access: GET /v1/jobs 200 " in line


def test_a_worker_log_line_carries_the_job_id_and_tenant(settings) -> None:
    with session_scope(settings) as s:
        job = JobRow(tenant="carol", dataset_id="gone", spec={**TINY_JOB}, status=JobStatus.QUEUED)
        s.add(job)
    with _captured("json") as stream:
        assert run_job(job.id, settings=settings) == JobStatus.FAILED
    lines = [x for x in _json_lines(stream) if x.get("logger") == "zoofit.worker"]
    failed = [x for x in lines if "failed" in x["message"]]
    assert failed, stream.getvalue()
    assert all(x["job_id"] == job.id and x["tenant"] == "carol" for x in failed)
    assert all(x.get("job_id") == job.id for x in lines)
    # outside the job, no job context remains
    with _captured("json") as stream:
        logging.getLogger("zoofit.worker").info("between jobs")
    (after,) = _json_lines(stream)
    assert "job_id" not in after and "tenant" not in after
