"""The one-line message of an error answer: problem+json, the older ``{"detail": ...}``, FastAPI's list, text."""

from __future__ import annotations

import httpx
import pytest

from service.client.errors import ApiError, error_message, raise_for_error


def _response(status: int, **kwargs) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "http://x/v1/jobs"), **kwargs)


@pytest.mark.parametrize(("status", "kwargs", "message"), [
    (404, {"json": {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "job x not found"}},
     "job x not found"),
    (422, {"json": {"type": "about:blank", "title": "Unprocessable Content", "status": 422,
                    "detail": "optimizer.lr: must be > 0",
                    "errors": [{"field": "optimizer.lr", "loc": ["body", "optimizer", "lr"], "message": "> 0"}]}},
     "optimizer.lr: must be > 0"),
    (422, {"json": {"type": "about:blank", "title": "Unprocessable Content", "status": 422,
                    "detail": "2 invalid fields",
                    "errors": [{"field": "optimizer.lr", "loc": ["body", "optimizer", "lr"], "message": "> 0"},
                               {"field": "epochs", "loc": ["body", "epochs"], "message": "an integer"}]}},
     "2 invalid fields; optimizer.lr: > 0; epochs: an integer"),
    (409, {"json": {"detail": "dataset d is used by\njob j"}}, "dataset d is used by job j"),
    (422, {"json": {"detail": [{"loc": ["body", "epochs"], "msg": "Input should be greater than 0"},
                               {"loc": ["query", "tta"], "msg": "bad"}]}},
     "epochs: Input should be greater than 0; query.tta: bad"),
    (502, {"text": "<html>\n<body>Bad gateway</body>\n</html>"}, "<html> <body>Bad gateway</body> </html>"),
    (503, {"content": b""}, "HTTP 503 Service Unavailable"),
    (500, {"json": {"title": "Internal Server Error"}}, "Internal Server Error"),
])
def test_error_message(status, kwargs, message):
    r = _response(status, **kwargs)
    assert error_message(r) == message
    with pytest.raises(ApiError) as exc:
        raise_for_error(r)
    assert exc.value.status == status and exc.value.message == message


def test_success_passes_through():
    r = _response(200, json={"ok": True})
    assert raise_for_error(r) is r


@pytest.mark.parametrize(("header", "seconds"), [
    ("30", 30.0),
    (" 7 ", 7.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: retry now
    ("soon", None),
    (b"\xb2", None),  # latin-1 off the wire: "²", a digit to str.isdigit, not to float()
    ("-5", None),
    (None, None),
])
def test_retry_after_is_read_from_seconds_or_a_date(header, seconds):
    raw = header if isinstance(header, bytes) else (header or "").encode()
    r = _response(429, json={"detail": "slow down"}, headers=[(b"Retry-After", raw)] if header else [])
    with pytest.raises(ApiError) as exc:
        raise_for_error(r)
    assert exc.value.retry_after == seconds


def test_retry_after_as_a_date_counts_from_now():
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    with pytest.raises(ApiError) as exc:
        raise_for_error(_response(503, content=b"", headers={"Retry-After": when}))
    assert exc.value.retry_after is not None and 110 <= exc.value.retry_after <= 120
