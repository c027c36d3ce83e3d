"""The predict endpoint's caps against hostile requests, on a real trained model."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

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


# --- decoding: memory, formats, pixel budget, concurrency --------------------------------------------------------

_HUGE_SIDE = 6300  # 39.7 Mpx: under the 40 Mpx per-image cap, ~160 MB once decoded, ~130 KB as a flat PNG


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (_HUGE_SIDE, _HUGE_SIDE), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _flat(fmt: str, size: tuple[int, int], colour: tuple[int, int, int] = (40, 90, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_large_images_decode_one_at_a_time_in_bounded_memory(trained: Trained, huge_png: bytes) -> None:
    # 8 images of 6300x6300 (1 MB on the wire) once took ~1.3 GB: all decoded at full size, then resized.
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    n = 8
    with trained_client(trained, predict_max_request_pixels=10**10) as c:
        assert _predict(c, trained, [("warm.png", _image(0))]).status_code == 200  # model loaded, threads up
        clear_refs.write_text("5")  # the peak RSS (VmHWM) restarts from the current RSS
        idle = _memory_kib("VmRSS")
        r = _predict(c, trained, [(f"{i}.png", huge_png) for i in range(n)])
        growth_mib = (_memory_kib("VmHWM") - idle) / 1024
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == n
    # One decoded image is ~160 MB (Pillow keeps RGB as 4 bytes a pixel); all eight would be 1.2 GB.
    assert growth_mib < 400, f"peak memory grew by {growth_mib:.0f} MiB for {n} images"


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "ICO", "SGI"])
def test_formats_outside_the_allow_list_are_400(trained: Trained, fmt: str) -> None:
    with trained_client(trained) as c:
        r = _predict(c, trained, [("ok.png", _image(0)), (f"odd.{fmt.lower()}", _flat(fmt, (16, 16)))])
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert f"odd.{fmt.lower()}" in detail and "ok.png" not in detail
    assert "not a recognised image format" in detail and "JPEG, PNG, BMP, GIF, WEBP, TIFF" in detail


def test_eps_never_reaches_ghostscript(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    calls: list[object] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nshowpage\n%%EOF\n"
    with trained_client(trained) as c:
        r = _predict(c, trained, [("figure.eps", eps)])
    assert r.status_code == 400, r.text
    assert "figure.eps" in r.json()["detail"] and "not a recognised image format" in r.json()["detail"]
    assert calls == []


def test_request_pixel_budget_is_413_naming_the_figures(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    decoded: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    wide = _flat("PNG", (3000, 2000))  # 6 Mpx each, under the per-image cap
    with trained_client(trained, predict_max_request_pixels=10_000_000) as c:
        r = _predict(c, trained, [("a.png", wide), ("b.png", wide)])
        assert r.status_code == 413, r.text
        detail = r.json()["detail"]
        assert "12000000 pixels" in detail and "10000000" in detail
        assert decoded == []  # refused from the headers alone
        assert _predict(c, trained, [("a.png", wide)]).status_code == 200  # one of them fits


def test_decoding_is_bounded_across_concurrent_requests(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    lock = threading.Lock()
    running = [0]
    most = [0]
    real_load = ImageFile.ImageFile.load

    def slow_load(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.15)  # long enough for the other requests to start decoding too, if they may
            return real_load(self)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    with trained_client(trained, predict_decode_slots=1) as c:
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(
                lambda k: _predict(c, trained, [(f"{k}-{i}.png", _image(i)) for i in range(2)]), range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert most[0] == 1


def test_pillow_bomb_warning_is_an_error(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between Image.MAX_IMAGE_PIXELS and twice that, Pillow only warns; the decoder must refuse.
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    with trained_client(trained) as c:  # max_image_pixels (40 Mpx) would let it through
        r = _predict(c, trained, [("ok.png", _image(0)), ("warned.png", _flat("PNG", (120, 100)))])
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "warned.png" in detail and "too many pixels" in detail and "ok.png" not in detail


@pytest.mark.parametrize("tta", ["none", "hflip", "five_crop"])
def test_predictions_match_the_predictor_for_each_tta(trained: Trained, tta: str) -> None:
    from models.artifact import load_predictor
    from models.data import open_image
    from service.db import ModelRow, session_scope

    with session_scope(trained.settings) as s:
        row = s.get(ModelRow, trained.model_id)
        assert row is not None
        predictor = load_predictor(trained.settings.data_dir / row.store_key, device="cpu")
    rng = np.random.default_rng(3)
    files = [(f"{i}.png", png_bytes(rng.integers(0, 256, (90 + 17 * i, 130, 3), dtype=np.uint8))) for i in range(3)]
    with trained_client(trained) as c:
        r = c.post(f"/v1/models/{trained.model_id}/predict", params={"tta": tta, "top_k": 50},
                   files=[("files", (name, data, "image/png")) for name, data in files])
    assert r.status_code == 200, r.text
    got = np.array([[{t["label"]: t["probability"] for t in p["top_k"]}[c] for c in predictor.classes]
                    for p in r.json()["predictions"]])
    want = predictor.predict_proba([open_image(data, name) for name, data in files], tta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_image_that_waits_too_long_for_a_decoding_slot_is_503(trained: Trained) -> None:
    # Every slot is busy (held here); the request gives its threadpool thread back instead of waiting forever.
    from service.decoding import decode_slots

    slots = decode_slots(1)
    assert slots.acquire(timeout=5)
    try:
        with trained_client(trained, predict_decode_slots=1, predict_decode_wait_s=0.2) as c:
            t0 = time.monotonic()
            r = _predict(c, trained, [("a.png", _image())])
            assert r.status_code == 503 and "decoding slots" in r.json()["detail"], r.text
            assert time.monotonic() - t0 < 5
    finally:
        slots.release()
    with trained_client(trained, predict_decode_slots=1, predict_decode_wait_s=0.2) as c:
        assert _predict(c, trained, [("a.png", _image())]).status_code == 200
