"""Every error answer is one shape: an RFC 9457 problem document (service.problems), whoever answers it."""

from __future__ import annotations

import httpx
from sqlalchemy.exc import OperationalError

from service.api.deps import get_tenant
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from tests.conftest import api_client
from tests.utils.data import TINY_JOB


def problem_of(r: httpx.Response, status: int) -> dict:
    """The answer's problem document, checked against the shape every error has."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM_MEDIA_TYPE, r.headers
    body = r.json()
    Problem.model_validate(body)
    assert body["type"] == "about:blank" and body["status"] == status, body
    assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"], body
    return body


def test_a_missing_record_is_a_404_problem(client):
    body = problem_of(client.get("/v1/jobs/nope"), 404)
    assert body["title"] == "Not Found" and "nope" in body["detail"]


def test_an_unknown_route_and_method_are_problems(client):
    body = problem_of(client.get("/v1/nowhere"), 404)
    assert body["detail"] == "no route GET /v1/nowhere"
    r = client.put("/v1/jobs")
    body = problem_of(r, 405)
    assert body["title"] == "Method Not Allowed" and "PUT /v1/jobs" in body["detail"]
    assert "allow" in r.headers  # kept from Starlette (which names the first matching route's methods)


def test_a_validation_error_names_each_field(client):
    r = client.post("/v1/jobs", json={"dataset_id": "d", **TINY_JOB, "optimizer": {"name": "adam", "lr": -1},
                                      "epochs": 0, "ensemble": {"backbones": ["resnet18", "nope"]}})
    body = problem_of(r, 422)
    assert body["title"] == "Unprocessable Entity"
    errors = {e["field"]: e for e in body["errors"]}
    assert set(errors) == {"optimizer.lr", "epochs", "ensemble.backbones[1]"}, body
    assert errors["optimizer.lr"]["loc"] == ["body", "optimizer", "lr"]
    assert errors["optimizer.lr"]["type"] == "greater_than" and "greater than 0" in errors["optimizer.lr"]["message"]
    # a validator's own message, without pydantic's "Value error, " prefix
    assert errors["ensemble.backbones[1]"]["message"].startswith("unknown backbone 'nope'; valid: ")
    # one line naming the fields, in the order pydantic found them
    assert body["detail"].startswith("optimizer.lr: Input should be greater than 0; "), body["detail"]
    assert "epochs: " in body["detail"] and "ensemble.backbones[1]: unknown backbone" in body["detail"]


def test_a_validation_error_of_a_query_parameter_and_a_whole_body(client):
    body = problem_of(client.get("/v1/jobs", params={"status": "sleeping"}), 422)
    assert body["errors"][0]["field"] == "status" and body["errors"][0]["loc"] == ["query", "status"]
    body = problem_of(client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
                      422)
    assert body["errors"][0]["field"] == "" and body["errors"][0]["type"] == "json_invalid"
    body = problem_of(client.post("/v1/jobs", json={"dataset_id": "d", "backbone": "resnet18"}), 422)
    assert body["errors"][0]["field"] == "" and "no bundled weights" in body["detail"]


def test_a_body_over_the_cap_is_a_413_problem(make_settings):
    with api_client(make_settings(upload_max_bytes="1000")) as c:
        r = c.post("/v1/datasets", files={"file": ("a.zip", b"x" * (3 * 1024 * 1024), "application/zip")})
    body = problem_of(r, 413)
    assert body["title"] == "Content Too Large" or body["title"] == "Request Entity Too Large"
    assert body["detail"] == f"request body exceeds the {body['limit']} byte limit for this route"


def test_a_missing_key_is_a_401_problem_saying_which_scheme(make_settings):
    with api_client(make_settings(), tenant=None) as c:
        r = c.get("/v1/datasets")
        body = problem_of(r, 401)
        assert body["title"] == "Unauthorized" and "Authorization" in body["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        body = problem_of(c.get("/v1/datasets", headers={"Authorization": "Bearer zf_nope"}), 401)
        assert body["detail"] == "invalid or revoked API key"


def test_a_nul_in_the_url_is_a_400_problem(client):
    body = problem_of(client.get("/v1/datasets/a%00b"), 400)
    assert body["title"] == "Bad Request" and "NUL" in body["detail"]


def test_a_lost_database_is_a_503_problem_to_retry(client):
    def lost() -> str:
        raise OperationalError("SELECT 1", {}, Exception("connection to server at 10.1.2.3 refused"))

    client.app.dependency_overrides[get_tenant] = lost
    r = client.get("/v1/datasets")
    body = problem_of(r, 503)
    assert body["title"] == "Service Unavailable" and "database is unavailable" in body["detail"]
    assert r.headers["retry-after"] == "5" and "10.1.2.3" not in r.text


def test_every_503_service_error_says_when_to_retry(client):
    from service.errors import ServiceError, Unavailable

    def busy() -> str:  # as the event hub's stream cap answers
        raise Unavailable("this API process serves 1 event streams already; retry later")

    client.app.dependency_overrides[get_tenant] = busy
    r = client.get("/v1/datasets")
    assert problem_of(r, 503)["detail"].startswith("this API process serves")
    assert r.headers["retry-after"] == "5"

    def other() -> str:
        raise ServiceError("the broker is away").with_status(503)

    client.app.dependency_overrides[get_tenant] = other
    r = client.get("/v1/datasets")
    assert problem_of(r, 503) and r.headers["retry-after"] == "5"


def test_a_console_path_that_is_no_asset_is_the_same_404_problem_as_a_missing_one(client):
    for path in ("/console/__init__.py", "/console/nope.js"):
        assert problem_of(client.get(path), 404)["title"] == "Not Found"


def test_extra_details_ride_along_but_never_replace_the_standard_members():
    from service.problems import problem

    doc = problem(409, "two\nlines", status=200, detail="no", job_ids=["a"])
    assert doc == {"type": "about:blank", "title": "Conflict", "status": 409, "detail": "two lines", "job_ids": ["a"]}
