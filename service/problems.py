"""One shape for every error answer: RFC 9457 problem details (``application/problem+json``).

``{"type": "about:blank", "title": <HTTP reason phrase>, "status": <int>, "detail": <one line>, ...extra}``;
a 422 from request validation adds ``errors``: ``[{"field", "loc", "message", "type"}]``.
The exception handlers of ``service.app`` and the ASGI middlewares that answer by themselves
(``service.limits``, ``service.api.gate``) all build their answer with :func:`problem_response`,
so the shape cannot drift between them; ``PROBLEM_RESPONSES`` declares it in the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Send

PROBLEM_MEDIA_TYPE = "application/problem+json"
# The members RFC 9457 defines; an extra detail field of the same name never replaces them.
_STANDARD = ("type", "title", "status", "detail")
# How many validation errors the one-line ``detail`` names before "and N more".
_DETAIL_ERRORS = 3


class FieldError(BaseModel):
    """One failed check of a request's input."""

    field: str = Field(description="dotted path in the body, or the parameter's name; empty for the whole body")
    loc: list[str | int] = Field(description="where the value is, as FastAPI locates it: ['body', 'optimizer', 'lr']")
    message: str = Field(description="what is wrong, for a person")
    type: str = Field(description="pydantic's error type, for a program (missing, literal_error, value_error, ...)")


class Problem(BaseModel):
    """An error answer (RFC 9457 problem details); other members carry details of the error."""

    model_config = ConfigDict(extra="allow")

    type: str = Field("about:blank", description="always about:blank: the status says what kind of error it is")
    title: str = Field(description="the HTTP reason phrase of the status")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong, in one line, for a person")
    errors: list[FieldError] | None = Field(None, description="422 from request validation: each failed check")


def problem(status: int, detail: str, /, **extra: Any) -> dict[str, Any]:
    """The problem document for ``status``: extra members first, the standard ones always win."""
    body = {k: v for k, v in extra.items() if k not in _STANDARD}
    return {"type": "about:blank", "title": _title(status), "status": status, "detail": one_line(detail), **body}


def problem_response(
    status: int, detail: str, /, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """An ``application/problem+json`` response; a 401 says which scheme to use (RFC 6750)."""
    all_headers = dict(headers or {})
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(problem(status, detail, **extra), status_code=status, headers=all_headers,
                        media_type=PROBLEM_MEDIA_TYPE)


async def send_problem(
    send: Send, status: int, detail: str, /, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> None:
    """Answer from a pure ASGI middleware, with the same bytes and headers as :func:`problem_response`."""
    response = problem_response(status, detail, headers=headers, **extra)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """``FieldError`` dicts from FastAPI's validation errors (pydantic's, with a ``loc`` from the request part)."""
    out = []
    for err in errors:
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        kind = str(err.get("type", "value_error"))
        # json_invalid's loc ends with a character position, not a field
        path = [] if kind == "json_invalid" else loc[1:] if loc and loc[0] in _PARTS else loc
        out.append({"field": _dotted(path), "loc": loc, "message": _message(err), "type": kind})
    return out


def validation_detail(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line naming the first failed fields: ``optimizer.lr: Input should be ...; epochs: ...``."""
    parts = [f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors[:_DETAIL_ERRORS]]
    more = len(errors) - _DETAIL_ERRORS
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "") if parts else "the request is invalid"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries declaring these error statuses as ``Problem`` answers."""
    return {status: _DECLARED[status] for status in statuses}


def add_problem_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Put ``Problem`` (which ``problem_responses`` refers to) into the schema's components."""
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(schema.pop("$defs", {}))
    schemas["Problem"] = schema
    return openapi


_PARTS = ("body", "query", "path", "header", "cookie")
_WHY = {
    400: "Bad request: the input cannot be used (a broken archive, an image that does not decode, a NUL in the URL)",
    401: "Missing, malformed, invalid or revoked API key",
    403: "The API key is not an admin key",
    404: "No such record for this tenant",
    409: "The record's state does not allow it",
    413: "The request body or its content is over a limit",
    422: "The request does not validate (errors[] names each field), or the job is too big for this service",
    429: "Too many of the tenant's jobs are waiting; retry once some have finished",
    503: "The database, broker or decoding capacity is unavailable; retry",
}
_DECLARED: dict[int, dict[str, Any]] = {
    status: {
        "description": why,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for status, why in _WHY.items()
}


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", ""))
    # pydantic prefixes a ValueError raised by a validator; the message itself is the explanation
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return one_line(msg)
