"""The one safe image decoder (``models.images``): allow-listed formats, pixel caps, small decodes."""

from __future__ import annotations

import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from models.data import open_image, to_array
from models.errors import BadImageError

ALLOWED = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    """A smooth RGB image: downscaling it several ways must give nearly the same pixels."""
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("fmt", ALLOWED)
def test_allowed_formats_decode(fmt: str) -> None:
    img = open_image(_encode(Image.new("RGB", (9, 7), (10, 200, 30)), fmt), f"x.{fmt.lower()}")
    assert img.mode == "RGB" and img.size == (9, 7)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "ICO", "SGI", "DDS"])
def test_other_formats_are_refused(fmt: str) -> None:
    data = _encode(Image.new("RGB", (16, 16), (10, 200, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    with pytest.raises(BadImageError, match="not a recognised image format") as info:
        open_image(data, "odd")
    assert info.value.name == "odd" and "JPEG, PNG, BMP, GIF, WEBP, TIFF" in info.value.reason


def test_eps_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nshowpage\n%%EOF\n"
    with pytest.raises(BadImageError, match="not a recognised image format"):
        open_image(eps, "figure.eps")
    assert calls == []


def test_pillow_bomb_warning_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Between Image.MAX_IMAGE_PIXELS and twice that, Pillow only warns (and decodes).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(BadImageError, match="too many pixels"):
        open_image(_encode(Image.new("RGB", (120, 100))), "warned.png")
    with pytest.raises(BadImageError, match="too many pixels"):  # over twice: Pillow's own error
        open_image(_encode(Image.new("RGB", (300, 100))), "bomb.png")


def test_decoding_leaves_other_threads_warning_filters_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # warnings.catch_warnings swaps the process-wide filter list: another thread decoding at the
    # same moment would run under (or restore) the wrong filters.
    inside, release = threading.Event(), threading.Event()
    real_open = Image.open

    def paused_open(*args: object, **kwargs: object) -> Image.Image:
        inside.set()
        release.wait(10)
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", paused_open)
    filters, snapshot = warnings.filters, list(warnings.filters)
    with ThreadPoolExecutor(1) as pool:
        decoded = pool.submit(open_image, _encode(Image.new("RGB", (8, 8))), "a.png")
        assert inside.wait(10)
        seen, seen_items = warnings.filters, list(warnings.filters)
        release.set()
        assert decoded.result().size == (8, 8)
    assert seen is filters and seen_items == snapshot


def test_header_cap_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.images import ImageTooLargeError, read_header

    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    data = _encode(Image.new("RGB", (300, 200)))
    assert read_header(data, "a.png", max_pixels=60_000).pixels == 60_000
    with pytest.raises(ImageTooLargeError, match="300x200 = 60000 pixels exceeds the limit of 59999") as info:
        read_header(data, "a.png", max_pixels=59_999)
    assert (info.value.size, info.value.limit) == ((300, 200), 59_999)
    with pytest.raises(ImageTooLargeError):
        open_image(data, "a.png", max_pixels=59_999)
    assert loads == []


def test_large_jpeg_decodes_at_reduced_size() -> None:
    from models.images import decode_array

    big = _gradient(4000, 3000)
    data = _encode(big, "JPEG", quality=95)
    small = open_image(data, "big.jpg", min_side=64)
    # Drafted by a power of two, still at least twice the side asked for (for a good resize).
    assert small.size == (500, 375)
    full = to_array(open_image(data, "big.jpg"), 64, "bicubic")
    arr = decode_array(data, "big.jpg", 64, "bicubic")
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert np.abs(arr.astype(int) - full.astype(int)).mean() < 1.5
    # Small JPEGs and other formats decode at full size, as before.
    assert open_image(_encode(_gradient(200, 150), "JPEG"), "s.jpg", min_side=64).size == (200, 150)
    assert open_image(_encode(big, "PNG"), "big.png", min_side=64).size == (4000, 3000)


def test_decode_array_matches_to_array_of_the_decoded_image() -> None:
    from models.images import decode_array

    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA"))
    np.testing.assert_array_equal(decode_array(data, "a.png", 32, "bicubic"),
                                  to_array(open_image(data, "a.png"), 32, "bicubic"))


def test_wide_grayscale_is_scaled_the_same_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.images as images_mod

    rng = np.random.default_rng(1)
    wide = rng.integers(0, 65536, (37, 23), dtype=np.uint16)
    img = Image.fromarray(wide)
    assert img.mode == "I;16"
    data = _encode(img)
    want = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    monkeypatch.setattr(images_mod, "_BLOCK_PIXELS", 50)  # several blocks of 2 rows
    got = np.asarray(open_image(data, "w.png"))
    np.testing.assert_array_equal(got, np.repeat(want[:, :, None], 3, axis=2))


def test_read_header_names_format_and_size() -> None:
    from models.images import IMAGE_FORMATS, read_header

    header = read_header(_encode(Image.new("L", (30, 20)), "GIF"), "g.gif")
    assert (header.width, header.height, header.format, header.pixels) == (30, 20, "GIF", 600)
    assert IMAGE_FORMATS == tuple(ALLOWED)
    with pytest.raises(BadImageError, match="not a recognised image format"):
        read_header(b"not an image at all", "x.png")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P"])
def test_transparency_is_composited_the_same_in_row_blocks(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    import models.images as images_mod

    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (37, 23, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        img = img.convert("RGB").quantize(16)
        img.info["transparency"] = 3
    else:
        img = img.convert(mode)
    whole = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    monkeypatch.setattr(images_mod, "_BLOCK_PIXELS", 50)  # several blocks of 2 rows
    np.testing.assert_array_equal(np.asarray(images_mod.to_rgb(img)), np.asarray(whole.convert("RGB")))
