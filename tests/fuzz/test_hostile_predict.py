"""The predict endpoint's caps against hostile requests, on a real trained model."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.sample_data import png_bytes
from tests.fuzz.conftest import Trained, trained_client
from tests.utils.archives import png_header_bomb
from tests.utils.data import animals


def _image(i: int = 0) -> bytes:
    return png_bytes(animals(3, 2, 2)[1][i][2])


def _predict(c: TestClient, trained: Trained, files: list[tuple[str, bytes]]):
    return c.post(f"/v1/models/{trained.model_id}/predict",
                  files=[("files", (name, data, "image/png")) for name, data in files])


def test_well_formed_request_predicts(trained: Trained) -> None:
    with trained_client(trained) as c:
        r = _predict(c, trained, [("a.png", _image(0)), ("b.png", _image(1))])
    assert r.status_code == 200, r.text
    assert [p["file"] for p in r.json()["predictions"]] == ["a.png", "b.png"]


def test_too_many_images_is_413(trained: Trained) -> None:
    with trained_client(trained, predict_max_images=2) as c:
        r = _predict(c, trained, [(f"{i}.png", _image(0)) for i in range(3)])
    assert r.status_code == 413
    assert "3 images" in r.json()["detail"] and "limit is 2" in r.json()["detail"]


def test_images_over_the_byte_cap_are_413(trained: Trained) -> None:
    # Under the transport cap (cap + 1 MiB of framing slack), over the cap on image bytes.
    with trained_client(trained, predict_max_bytes=2000) as c:
        r = _predict(c, trained, [("big.png", b"\x89PNG" + b"\x00" * 4000)])
    assert r.status_code == 413 and "2000 bytes" in r.json()["detail"]


def test_body_over_the_transport_cap_is_413_before_parsing(trained: Trained) -> None:
    with trained_client(trained, predict_max_bytes=2000) as c:
        r = _predict(c, trained, [("huge.png", b"\x00" * (2 * 1024 * 1024))])
        assert r.status_code == 413 and "limit for this route" in r.json()["detail"]
        # the server is fine afterwards
        assert _predict(c, trained, [("a.png", _image(0))]).status_code == 200


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        pytest.param((8000, 8000), "exceeds the limit", id="over-max_image_pixels"),
        pytest.param((20000, 20000), "too many pixels", id="over-PIL-bomb-guard"),
    ],
)
def test_pixel_bomb_is_400_naming_the_file(trained: Trained, size: tuple[int, int], reason: str) -> None:
    bomb = png_header_bomb(*size)
    assert len(bomb) < 100_000  # tiny on the wire, gigabytes once decoded
    with trained_client(trained) as c:
        r = _predict(c, trained, [("ok.png", _image(0)), ("bomb.png", bomb)])
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "bomb.png" in detail and reason in detail and "ok.png" not in detail


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x01garbage" * 50, id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xd8\xff\xe0 not really a jpeg", id="fake-jpeg-magic"),
        pytest.param(b"TRUNCATED", id="truncated-png"),  # replaced below by a real, cut PNG
    ],
)
def test_undecodable_file_is_400_naming_the_file(trained: Trained, data: bytes) -> None:
    if data == b"TRUNCATED":
        data = _image(0)[:60]
    with trained_client(trained) as c:
        r = _predict(c, trained, [("ok.png", _image(0)), ("broken.png", data)])
    assert r.status_code == 400, r.text
    assert "broken.png" in r.json()["detail"] and "ok.png" not in r.json()["detail"]
    assert r.json()["files"][0].startswith("broken.png")


def test_zero_files_is_422(trained: Trained) -> None:
    with trained_client(trained) as c:
        no_files = c.post(f"/v1/models/{trained.model_id}/predict", data={"other": "x"})
        not_multipart = c.post(f"/v1/models/{trained.model_id}/predict", json={"files": []})
    for r in (no_files, not_multipart):
        assert r.status_code == 422, r.text
        assert "files" in str(r.json()["detail"])
