"""A /v1 request without a valid API key is refused before a single byte of its body is read.

Otherwise an anonymous client makes the server parse (and spool to disk) one upload-sized
multipart body per request before the key is even looked at. The app is driven as raw ASGI
here, so the test sees exactly how often the server asked for the body (``receive``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event

from service.app import create_app
from service.auth import revoke_key
from service.config import Settings, get_settings
from service.db import ApiKeyRow, get_engine, session_scope
from tests.conftest import issue_key
from tests.utils.data import animals_zip

CHUNK = 1024 * 1024
CHUNKS = 16  # a 16 MiB upload


@dataclass
class Exchange:
    status: int = 0
    body: bytes = b""
    chunks_read: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def detail(self) -> str:
        return str(json.loads(self.body)["detail"])


def _multipart(payload: bytes) -> tuple[bytes, list[bytes]]:
    """A multipart body with one file field, cut into CHUNK-sized pieces."""
    boundary = b"zoofitboundary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n'
            b"Content-Type: application/zip\r\n\r\n" + payload + b"\r\n--" + boundary + b"--\r\n")
    return b"multipart/form-data; boundary=" + boundary, [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]


def _post(settings: Settings, path: str, authorization: str | None, payload: bytes | None = None) -> Exchange:
    """POST ``payload`` (default: 16 MiB of zeros) to ``path`` through the ASGI app; record what it read."""
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    content_type, chunks = _multipart(b"\x00" * (CHUNK * CHUNKS) if payload is None else payload)
    seen = Exchange()

    async def receive() -> dict[str, Any]:
        if seen.chunks_read >= len(chunks):
            await asyncio.sleep(3600)  # a real client would hold the connection
        seen.chunks_read += 1
        return {"type": "http.request", "body": chunks[seen.chunks_read - 1],
                "more_body": seen.chunks_read < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        seen.messages.append(message)
        if message["type"] == "http.response.start":
            seen.status = message["status"]
        elif message["type"] == "http.response.body":
            seen.body += message.get("body", b"")

    headers = [(b"host", b"testserver"), (b"content-type", content_type),
               (b"content-length", str(sum(map(len, chunks))).encode())]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
        "state": {},
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))
    return seen


def test_upload_without_a_key_is_401_with_the_body_unread(settings):
    seen = _post(settings, "/v1/datasets", None)
    assert seen.status == 401 and "Authorization" in seen.detail
    assert seen.chunks_read == 0
    assert list(settings.tmp_dir.iterdir()) == []


def test_bad_malformed_or_revoked_keys_are_401_with_the_body_unread(settings):
    revoked = issue_key(settings, "carol")
    with session_scope(settings) as s:
        revoke_key(s, s.query(ApiKeyRow).filter_by(tenant="carol").one().id)
    for authorization in ("Bearer zf_nope", "Basic YWxpY2U6cHc=", "Bearer ", f"Bearer {revoked}"):
        seen = _post(settings, "/v1/datasets", authorization)
        assert (seen.status, seen.chunks_read) == (401, 0), (authorization, seen.status, seen.body)


def test_every_v1_path_is_gated_even_unknown_ones(settings):
    for path in ("/v1/models/x/predict", "/v1/keys", "/v1/no-such-route", "/v1"):
        seen = _post(settings, path, None)
        assert (seen.status, seen.chunks_read) == (401, 0), (path, seen.status)


def test_a_valid_key_reaches_the_route(settings):
    key = issue_key(settings, "alice")
    seen = _post(settings, "/v1/datasets", f"Bearer {key}", payload=animals_zip(3, 2))
    assert seen.status == 201, seen.body
    assert seen.chunks_read == 1


def test_with_auth_disabled_the_gate_passes_everything_through(make_settings):
    s = make_settings(auth_enabled="false")
    seen = _post(s, "/v1/datasets", None, payload=animals_zip(3, 2))
    assert seen.status == 201, seen.body


def test_routes_outside_v1_are_not_gated(settings):
    seen = _post(settings, "/healthz", None, payload=b"")
    assert seen.status in (200, 405)  # /healthz is GET-only: the point is that it is not 401


def test_a_request_looks_its_key_up_once(settings, client):
    lookups: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "api_keys" in statement:
            lookups.append(statement)

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", count)
    try:
        assert client.get("/v1/datasets").status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(lookups) == 1, lookups


def test_an_unreachable_key_store_is_503_with_the_body_unread(make_settings):
    s = make_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    seen = _post(s, "/v1/datasets", "Bearer zf_whatever")
    assert (seen.status, seen.chunks_read) == (503, 0), seen.body
    assert "database is unavailable" in seen.detail
