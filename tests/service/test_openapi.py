"""The OpenAPI schema is one a generated client can use: named operations, the bearer key,
enums for every closed set, and every error answer declared as a Problem."""

from __future__ import annotations

import re
from typing import Any, get_args

import pytest
from fastapi.routing import APIRoute

from models.spec import BACKBONES, JOB_DEVICES, OPTIMIZERS, SCHEDULES, WEIGHT_SOURCES, JobDevice, WeightSource
from service.app import create_app
from service.config import Settings
from service.db import JobStatus
from service.presets import PRESETS
from service.problems import PROBLEM_MEDIA_TYPE
from service.schemas import JobStatusName

OPERATION_ID = re.compile(r"^[a-z]+-[a-z-]+$")
APP = create_app(Settings(auth_enabled=True))
SCHEMA: dict[str, Any] = APP.openapi()
OPERATIONS = [(path, method, op) for path, item in SCHEMA["paths"].items() for method, op in item.items()]


def _api_routes() -> list[tuple[str, APIRoute]]:
    """Every route of the app with its full path (FastAPI >= 0.16x keeps included routers nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI copies included routes into app.routes
        return [(r.path, r) for r in APP.routes if isinstance(r, APIRoute)]
    return [(str(c.path), c.original_route) for c in iter_route_contexts(APP.routes)
            if isinstance(c.original_route, APIRoute)]


def test_every_route_has_an_explicit_operation_id_that_reads_as_a_name():
    routes = _api_routes()
    ids = [r.operation_id for _, r in routes]
    unnamed = [f"{sorted(r.methods)} {path}" for path, r in routes if r.operation_id is None]
    assert not unnamed, f"give these routes operation_id='<tag>-<verb>': {unnamed}"
    assert all(OPERATION_ID.match(i or "") for i in ids), ids
    assert len(set(ids)) == len(ids), ids
    assert {op["operationId"] for _, _, op in OPERATIONS} == {r.operation_id for _, r in routes if r.include_in_schema}
    assert {"datasets-upload", "jobs-create", "jobs-get", "models-predict", "presets-list"} <= set(ids)


def test_the_api_key_is_a_bearer_security_scheme():
    assert SCHEMA["components"]["securitySchemes"]["ApiKey"]["type"] == "http"
    assert SCHEMA["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    for path, method, op in OPERATIONS:
        wanted = [{"ApiKey": []}] if path.startswith("/v1/") else None
        assert op.get("security") == wanted, (method, path)
        # the key is the scheme's business, not a header parameter of every route
        assert all(p["name"].lower() != "authorization" for p in op.get("parameters", [])), (method, path)


def _schema(name: str) -> dict[str, Any]:
    return SCHEMA["components"]["schemas"][name]  # type: ignore[no-any-return]


def _job_status_parameter() -> dict[str, Any]:
    (param,) = [p for p in SCHEMA["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status"]
    return param["schema"]["anyOf"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("where", "schema", "names"), [
    ("backbone", lambda: _schema("JobCreate")["properties"]["backbone"], list(BACKBONES)),
    ("ensemble.backbones[]", lambda: _schema("EnsembleSpec")["properties"]["backbones"]["items"], list(BACKBONES)),
    ("optimizer.name", lambda: _schema("OptimizerSpec")["properties"]["name"], list(OPTIMIZERS)),
    ("sweep.optimizers[]", lambda: _schema("SweepSpec")["properties"]["optimizers"]["items"],
     [n for n in OPTIMIZERS if n != "lbfgs"]),
    ("schedule.name", lambda: _schema("ScheduleSpec")["properties"]["name"], list(SCHEDULES)),
    ("weights", lambda: _schema("JobCreate")["properties"]["weights"], list(WEIGHT_SOURCES)),
    ("device", lambda: _schema("JobCreate")["properties"]["device"], list(JOB_DEVICES)),
    ("freeze.mode", lambda: _schema("FreezeSpec")["properties"]["mode"],
     ["none", "linear_probe", "first_n", "gradual", "auto"]),
    ("job status (answer)", lambda: _schema("JobSummaryPublic")["properties"]["status"], list(JobStatus.ALL)),
    ("job status (filter)", _job_status_parameter, list(JobStatus.ALL)),
    ("backbone card", lambda: _schema("BackbonePublic")["properties"]["name"], list(BACKBONES)),
    ("weight sources", lambda: _schema("BackbonePublic")["properties"]["weight_sources"]["items"],
     list(WEIGHT_SOURCES)),
    ("preset", lambda: _schema("PresetPublic")["properties"]["name"], list(PRESETS)),
])
def test_closed_sets_are_enums_of_their_registries(where, schema, names):
    assert schema()["enum"] == names, where


def test_the_literal_copies_of_registries_match():
    assert get_args(JobStatusName) == JobStatus.ALL
    assert get_args(WeightSource) == WEIGHT_SOURCES
    assert get_args(JobDevice) == JOB_DEVICES


def test_every_error_answer_is_declared_as_a_problem():
    assert "HTTPValidationError" not in SCHEMA["components"]["schemas"]
    assert "ValidationError" not in SCHEMA["components"]["schemas"]
    assert {"type", "title", "status", "detail", "errors"} <= set(_schema("Problem")["properties"])
    for path, method, op in OPERATIONS:
        errors = {int(code): r for code, r in op["responses"].items() if int(code) >= 400}
        if path == "/readyz":
            errors.pop(503)  # its readiness report, which probes read as it is
        for code, response in errors.items():
            assert response["content"] == {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}, (
                method, path, code)
        wanted = {400, 413} | ({401, 422, 503} if path.startswith("/v1/") else set())
        assert wanted <= set(errors), (method, path, sorted(errors))
        if "{" in path:
            assert 404 in errors, (method, path)
