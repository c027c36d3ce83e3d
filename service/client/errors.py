"""The one-line message of an API error answer, whatever shape its body has."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class ApiError(Exception):
    """The API answered with an error status; ``message`` is its one-line ``detail``, ``retry_after``
    the seconds its ``Retry-After`` asked for (a 429 or a 503), None without one."""

    def __init__(self, status: int, message: str, body: Any = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body
        self.retry_after = retry_after


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the answer's ``Retry-After`` asks the client to wait (RFC 9110: seconds or an HTTP
    date), None without a readable one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _detail_text(detail: Any) -> str | None:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI's own 422 shape: [{"loc": [...], "msg": "..."}]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                msg = str(item.get("msg") or item.get("message") or "")
                parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(p for p in parts if p) or None
    return None


def error_message(response: httpx.Response) -> str:
    """``detail`` of an RFC 9457 problem+json body, else of the older ``{"detail": ...}`` shape, else the text.

    Always one line, never empty: a body with nothing to show gives ``HTTP <status> <reason>``.
    """
    fallback = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = _one_line(response.text[:500]) if response.text else ""
        return text or fallback
    if isinstance(body, dict):
        detail = _detail_text(body.get("detail"))
        fields = _field_errors(body.get("errors"), detail or "")
        if detail or fields:
            return _one_line("; ".join(p for p in (detail, fields) if p))
        if isinstance(body.get("title"), str):
            return _one_line(body["title"])
    return fallback


def _field_errors(errors: Any, detail: str) -> str:
    """A 422's ``errors[]`` as ``field: message``, for the fields ``detail`` does not already name.

    A terminal has no form to put each message next to its field, so the line carries them.
    """
    if not isinstance(errors, list):
        return ""
    parts = [f"{e.get('field') or '.'.join(map(str, e.get('loc', [])))}: {e.get('message', '')}"
             for e in errors if isinstance(e, dict)]
    return "; ".join(p for p in parts if p.partition(":")[0] not in detail)


def raise_for_error(response: httpx.Response) -> httpx.Response:
    """``response`` itself when it succeeded; an :class:`ApiError` with the API's message otherwise."""
    if response.is_success:
        return response
    response.read()
    try:
        body = response.json()
    except ValueError:
        body = None
    raise ApiError(response.status_code, error_message(response), body, retry_after(response))
