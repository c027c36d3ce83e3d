"""Caps checked before the costly work: a zip's entry count and central-directory size are read
from its end records before ``zipfile.ZipFile`` parses the directory (about 470 bytes of memory
per entry), and a dataset's total pixels are summed from image headers before any image is decoded.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from service.ingest import IngestLimits
from service.ingest import dataset as ingest_dataset
from tests.conftest import api_client
from tests.service.test_ingest import TWO_CLASSES, build, ingest, rejected
from tests.utils.archives import dataset_members, write_zip

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_LOCATOR64 = struct.Struct("<4sLQL")


def _eocd(data: bytes) -> tuple[int, tuple[int, ...]]:
    at = data.rfind(b"PK\x05\x06")
    return at, _EOCD.unpack_from(data, at)


def declare_entries(path: Path, entries: int) -> Path:
    """Rewrite the end-of-central-directory record to declare ``entries`` members."""
    data = bytearray(path.read_bytes())
    at, (sig, disk, cd_disk, _n, _total, size, offset, comment) = _eocd(bytes(data))
    data[at:at + _EOCD.size] = _EOCD.pack(sig, disk, cd_disk, entries, entries, size, offset, comment)
    path.write_bytes(bytes(data))
    return path


def as_zip64(path: Path, entries: int | None = None, cd_size: int | None = None) -> Path:
    """Give the zip a ZIP64 end record (with ``entries``/``cd_size`` if given); the classic one says 'see ZIP64'."""
    data = path.read_bytes()
    at, (sig, _disk, _cd_disk, _n, total, size, offset, comment) = _eocd(data)
    entries = total if entries is None else entries
    record = _EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, entries, entries,
                          size if cd_size is None else cd_size, offset)
    locator = _LOCATOR64.pack(b"PK\x06\x07", 0, at, 1)
    classic = _EOCD.pack(sig, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, comment)
    path.write_bytes(data[:at] + record + locator + classic + data[at + _EOCD.size:])
    return path


def forbid_zipfile(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """From now on, fail if anything constructs a zipfile.ZipFile (the costly directory parse)."""
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError("zipfile.ZipFile was constructed before the entry cap was checked")

    monkeypatch.setattr(zipfile, "ZipFile", refuse)
    return calls


def test_eocd_declaring_too_many_entries_is_413_before_zipfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = build(tmp_path, "zip", dataset_members(TWO_CLASSES))
    declare_entries(src, 60_000)
    no_zipfile = forbid_zipfile(monkeypatch)

    err = rejected(src, tmp_path, IngestLimits(max_members=50_000), status=413)

    assert err.message == "the archive has 60000 entries (files and folders); the limit is 50000"
    assert no_zipfile == []


def test_zip64_eocd_declaring_too_many_entries_is_413_before_zipfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = as_zip64(build(tmp_path, "zip", dataset_members(TWO_CLASSES)), entries=10**12)
    no_zipfile = forbid_zipfile(monkeypatch)

    err = rejected(src, tmp_path, IngestLimits(max_members=50_000), status=413)

    assert err.message == f"the archive has {10**12} entries (files and folders); the limit is 50000"
    assert no_zipfile == []


def test_an_eocd_that_understates_its_entries_is_caught_by_counting_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # zipfile parses every entry in the declared directory bytes, whatever count the EOCD gives.
    src = declare_entries(build(tmp_path, "zip", dataset_members({"cat": 5, "dog": 5})), 2)
    no_zipfile = forbid_zipfile(monkeypatch)

    err = rejected(src, tmp_path, IngestLimits(max_members=5), status=413)

    assert "more than 5 entries" in err.message and "declares 2" in err.message
    assert no_zipfile == []


def test_an_oversized_central_directory_is_413_before_zipfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two entries (within the cap of 2) whose 3000-byte comments make a ~6 KiB directory; 2 entries may use 2 KiB.
    extra = []
    for name in ("cat/0.png", "dog/0.png"):
        info = zipfile.ZipInfo(name)
        info.comment = b"c" * 3000
        extra.append((info, b"x"))
    (tmp_path / "uploads").mkdir()
    src = write_zip(tmp_path / "uploads" / "upload.zip", {}, extra=extra)
    no_zipfile = forbid_zipfile(monkeypatch)

    err = rejected(src, tmp_path, IngestLimits(max_members=2), status=413)

    assert err.message.startswith("the archive's central directory is 6.0 KiB; the limit is 2.0 KiB"), err.message
    assert no_zipfile == []


def test_an_honest_zip64_archive_is_still_accepted(tmp_path: Path) -> None:
    src = as_zip64(build(tmp_path, "zip", dataset_members(TWO_CLASSES)))

    assert ingest(src, tmp_path).counts == {"cat": 2, "dog": 2}


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_a_dataset_over_the_total_pixel_cap_is_413_before_decoding(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[Path] = []
    monkeypatch.setattr(ingest_dataset, "_image_problem", lambda path, _max: decoded.append(path))
    src = build(tmp_path, fmt, dataset_members({"cat": 3, "dog": 3}))  # six 16x16 images: 1536 pixels

    err = rejected(src, tmp_path, IngestLimits(max_total_pixels=1000), status=413)

    assert "1,536 pixels" in err.message and "1,000" in err.message, err.message
    assert decoded == []


def test_a_dataset_at_the_total_pixel_cap_is_accepted(tmp_path: Path) -> None:
    src = build(tmp_path, "zip", dataset_members({"cat": 3, "dog": 3}))

    assert ingest(src, tmp_path, IngestLimits(max_total_pixels=1536)).num_images == 6


def test_total_pixel_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_total_pixels"):
        IngestLimits(max_total_pixels=0)


def test_the_api_applies_the_dataset_pixel_setting(make_settings) -> None:
    s = make_settings(max_dataset_pixels="1000")
    with api_client(s) as c:
        r = c.post("/v1/datasets", files={"file": ("a.zip", build_bytes(s.tmp_dir.parent), "application/zip")})
    assert r.status_code == 413, r.text
    assert "1,536 pixels" in r.json()["detail"]
    assert list(s.datasets_dir.iterdir()) == []


def build_bytes(where: Path) -> bytes:
    return build(where, "zip", dataset_members({"cat": 3, "dog": 3})).read_bytes()
