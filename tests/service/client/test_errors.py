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
