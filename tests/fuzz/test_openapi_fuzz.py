"""schemathesis against the app's own OpenAPI schema, in-process: no operation answers 5xx.

Every operation of the schema is a test case of its own, fuzzed with schema-conforming and
schema-violating requests, on real state (a stored dataset, a queued job and a trained model)
so that requests naming real ids go past the 404 and reach the code behind it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from sqlalchemy import select

from service.admission import WAITING_STAGE, in_flight
from service.api.deps import get_enqueue
from service.app import create_app
from service.config import Settings, get_settings
from service.db import JobRow, session_scope
from tests.fuzz.conftest import Trained, fuzz_settings, pg_database, trained_store
from tests.utils.data import TINY_JOB, animals_zip

MAX_EXAMPLES = 12
# The multipart routes parse and decode what they receive: they get more examples.
MULTIPART_EXAMPLES = 50
# The schema itself decides what is fuzzed: a new route is fuzzed without touching this file.
_PATHS = create_app(Settings(auth_enabled=True)).openapi()["paths"]
OPERATIONS = [
    (method.upper(), path)
    for path, item in _PATHS.items()
    for method in item
]
# Deletions last, so the other operations still find the seeded records.
OPERATIONS.sort(key=lambda op: op[0] == "DELETE")
# An unfinished job's event stream never ends, and the in-process client waits for whole responses:
# these operations get the finished (trained) job's id instead of the queued one's.
STREAMS = {("GET", "/v1/jobs/{job_id}/events")}


@dataclass
class Target:
    schema: schemathesis.BaseSchema
    key: str
    ids: dict[str, str]
    enqueued: list[str]  # job ids the API handed to the (stubbed) broker
    settings: Settings


@pytest.fixture(scope="module", params=[
    "sqlite",
    # The production store: PostgreSQL refuses what SQLite takes (NUL bytes, over-long text).
    pytest.param("postgresql", marks=pytest.mark.integration),
])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The app on a data folder with a dataset, a trained model, a queued job and a second API key."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database()) if request.param == "postgresql" else None
        trained = stack.enter_context(trained_store(tmp_path_factory.mktemp("fuzz") / "data", url))
        yield _target(trained)


def _target(trained: Trained) -> Target:
    from fastapi.testclient import TestClient

    s = trained.settings.model_copy(update={"predict_max_images": 4})
    app = create_app(s)
    app.dependency_overrides[get_settings] = lambda: s
    enqueued: list[str] = []
    app.dependency_overrides[get_enqueue] = lambda: enqueued.append
    with TestClient(app, headers={"Authorization": f"Bearer {trained.key}"}) as c:
        queued = c.post("/v1/jobs", json={"dataset_id": trained.dataset_id, **TINY_JOB}).json()
        other = c.post("/v1/keys", json={"tenant": "other"}).json()
    with session_scope(s) as session:
        finished = session.scalar(select(JobRow.id).where(JobRow.model_id == trained.model_id))
    ids = {"dataset_id": trained.dataset_id, "job_id": queued["id"], "model_id": trained.model_id,
           "key_id": other["id"], "finished_job_id": finished}
    return Target(schemathesis.openapi.from_asgi("/openapi.json", app), trained.key, ids, enqueued, s)


def _cases(target: Target, method: str, path: str) -> st.SearchStrategy[schemathesis.Case]:
    operation = target.schema[path][method]
    names = [p.name for p in operation.path_parameters]
    real = {n: target.ids[n] for n in names if n in target.ids}
    if (method, path) in STREAMS:
        real["job_id"] = target.ids["finished_job_id"]
    # Mostly the valid key (so requests reach the route), sometimes whatever the schema allows.
    auth = st.sampled_from([{"authorization": f"Bearer {target.key}"}] * 3 + [None])
    ids = st.sampled_from([real, None]) if real else st.just(None)
    modes = st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE])

    def real_ids_in_body(case: schemathesis.Case, use: bool) -> schemathesis.Case:
        if use and isinstance(case.body, dict):
            case.body.update({k: v for k, v in target.ids.items() if k in case.body})
        return case

    return st.tuples(modes, ids, auth, st.booleans()).flatmap(
        lambda t: operation.as_strategy(generation_mode=t[0], path_parameters=t[1], headers=t[2]).map(
            lambda case: real_ids_in_body(case, t[3])
        )
    )


def _known_good(target: Target, method: str, path: str) -> list[tuple[schemathesis.Case, int]]:
    """Valid multipart requests, sent first: proof that the fuzzer's requests reach the real code."""
    from service.sample_data import png_bytes

    operation = target.schema[path][method]
    auth = {"authorization": f"Bearer {target.key}"}
    if (method, path) == ("POST", "/v1/datasets"):
        body = {"file": animals_zip(2, 2), "name": "fuzz-seed"}
        return [(operation.Case(headers=auth, body=body, media_type="multipart/form-data"), 201)]
    if (method, path) == ("POST", "/v1/models/{model_id}/predict"):
        from tests.utils.data import animals

        images = [png_bytes(img) for _, _, img in animals(3, 2, 2)[1][:2]]
        case = operation.Case(path_parameters={"model_id": target.ids["model_id"]}, headers=auth,
                              body={"files": images}, query={"top_k": 2}, media_type="multipart/form-data")
        return [(case, 200)]
    return []


def _assert_sent_or_waiting_its_turn(target: Target, job: dict) -> None:
    """Accepted means handed to the broker, or waiting while its tenant's slots are all taken."""
    if job["id"] in target.enqueued:
        return
    with session_scope(target.settings) as session:
        row = session.get(JobRow, job["id"])
        assert row is not None and row.enqueued_at is None and job["progress"]["stage"] == WAITING_STAGE, job
        assert in_flight(session, row.tenant) >= target.settings.tenant_max_running_jobs


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_operation_answers_5xx(target: Target, method: str, path: str) -> None:
    for case, status in _known_good(target, method, path):
        response = case.call()
        assert response.status_code == status, response.text

    multipart = "multipart/form-data" in _PATHS[path][method.lower()].get("requestBody", {}).get("content", {})

    @given(case=_cases(target, method, path))
    @fuzz_settings(MULTIPART_EXAMPLES if multipart else MAX_EXAMPLES)
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=[not_a_server_error])
        if (method, path) == ("POST", "/v1/jobs") and response.status_code == 202:
            _assert_sent_or_waiting_its_turn(target, response.json())

    fuzz()
