"""Decoding, array conversion, the decoded-array cache and the stratified split."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import data as data_mod
from models.data import load_folder, open_image, stratified_split, to_array
from models.errors import BadImageError, TrainingError
from tests.utils.datasets import LFW_CLASSES


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_grayscale_becomes_rgb() -> None:
    img = open_image(_encode(Image.new("L", (5, 4), 77)), "gray.png")
    assert img.mode == "RGB" and img.size == (5, 4)
    assert np.all(np.asarray(img) == 77)


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent red
    arr = np.asarray(open_image(_encode(rgba), "a.png"))
    assert arr[0, 0].tolist() == [255, 0, 0]
    assert arr[0, 1].tolist() == [255, 255, 255]


def test_palette_with_and_without_transparency() -> None:
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(open_image(_encode(p), "p.png"))[0, 0].tolist() == [10, 200, 30]
    p.info["transparency"] = 1
    assert np.asarray(open_image(_encode(p, transparency=1), "pt.png"))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_and_16_bit_gray() -> None:
    cmyk = open_image(_encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), "c.jpg")
    assert cmyk.mode == "RGB" and np.asarray(cmyk).min() > 240
    wide = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(open_image(_encode(wide), "w.png")).min() == 255


def test_path_input(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(path)
    assert open_image(path, "x.jpg").size == (8, 6)


@pytest.mark.parametrize(
    "payload",
    [b"this is not an image", b"", _encode(Image.new("RGB", (64, 64), 9), "JPEG")[:200]],
    ids=["garbage", "empty", "truncated-jpeg"],
)
def test_bad_bytes_raise_bad_image(payload: bytes) -> None:
    with pytest.raises(BadImageError) as info:
        open_image(payload, "holiday.jpg")
    assert info.value.name == "holiday.jpg"
    assert "holiday.jpg" in str(info.value)


def test_to_array_resizes_shorter_side_and_center_crops() -> None:
    stripes = np.zeros((10, 30, 3), dtype=np.uint8)
    stripes[:, :10] = (255, 0, 0)
    stripes[:, 10:20] = (0, 255, 0)
    stripes[:, 20:] = (0, 0, 255)
    out = to_array(Image.fromarray(stripes), 10, "nearest")
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert np.all(out == (0, 255, 0))
    up = to_array(Image.fromarray(stripes), 20, "bicubic")
    assert up.shape == (20, 20, 3)
    assert to_array(Image.new("L", (7, 50)), 16, "bilinear").shape == (16, 16, 3)
    with pytest.raises(ValueError, match="interpolation"):
        to_array(Image.new("RGB", (4, 4)), 4, "sinc")


def test_load_folder_reads_classes_in_order(lfw_root: Path) -> None:
    (lfw_root / "face" / ".DS_Store").write_bytes(b"junk")
    try:
        data = load_folder(lfw_root, ["not_face", "face"], 16, "bilinear", cache_dir=None)
    finally:
        (lfw_root / "face" / ".DS_Store").unlink()
    assert data.images.shape == (200, 16, 16, 3) and data.images.dtype == np.uint8
    assert data.classes == ["not_face", "face"]
    assert data.labels.tolist() == [0] * 100 + [1] * 100
    assert data.names[0] == "not_face/0000.png" and data.names[100] == "face/0000.png"
    assert data.counts() == {"not_face": 100, "face": 100}


def test_load_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(BadImageError) as info:
        load_folder(tmp_path, ["cats"], 8, "bicubic", None)
    assert info.value.name == "cats/bad.jpg"
    with pytest.raises(TrainingError, match="dogs"):
        load_folder(tmp_path, ["cats", "dogs"], 8, "bicubic", None)


def test_cache_second_load_does_not_decode(lfw_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = load_folder(lfw_root, LFW_CLASSES, 24, "bicubic", cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    with np.load(files[0], allow_pickle=False) as z:  # readable without pickle
        assert z["images"].shape == (200, 24, 24, 3)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_mod, "open_image", no_decoding)
    second = load_folder(lfw_root, LFW_CLASSES, 24, "bicubic", cache)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels)
    assert second.classes == first.classes and second.names == first.names

    # Another size or another interpolation is another cache entry: it must decode.
    for size, interp in ((20, "bicubic"), (24, "bilinear")):
        with pytest.raises(AssertionError, match="decoded again"):
            load_folder(lfw_root, LFW_CLASSES, size, interp, cache)
    assert [p.name for p in cache.iterdir()] == [files[0].name]  # no temp files left behind


def test_cache_notices_changed_dataset(lfw_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    load_folder(lfw_root, LFW_CLASSES, 16, "bicubic", cache)
    extra = lfw_root / "face" / "zzz_new.png"
    Image.new("L", (25, 25), 3).save(extra)
    try:
        data = load_folder(lfw_root, LFW_CLASSES, 16, "bicubic", cache)
        assert len(data) == 201 and data.names[100] == "face/zzz_new.png"
    finally:
        extra.unlink()
    assert len(list(cache.iterdir())) == 2


def test_cache_ignores_a_corrupt_file(lfw_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_folder(lfw_root, LFW_CLASSES, 16, "bicubic", cache)
    entry = next(cache.iterdir())
    entry.write_bytes(b"garbage")
    again = load_folder(lfw_root, LFW_CLASSES, 16, "bicubic", cache)
    assert np.array_equal(first.images, again.images)


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    labels = np.array([0] * 50 + [1] * 7 + [2] * 2 + [3] * 1)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    for c in (0, 1, 2):
        assert c in labels[train] and c in labels[val]
    assert 3 in labels[train] and 3 not in labels[val]
    assert np.sum(labels[val] == 0) == 10
    assert np.sum(labels[val] == 1) == 1


def test_stratified_split_is_seeded() -> None:
    labels = np.repeat(np.arange(4), 25)
    a = stratified_split(labels, 0.3, seed=1)
    b = stratified_split(labels, 0.3, seed=1)
    c = stratified_split(labels, 0.3, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
