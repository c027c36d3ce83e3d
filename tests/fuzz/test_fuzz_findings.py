"""Regression tests for what the fuzzers found, each once a 500 (or an unhandled exception)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from service.ingest import DatasetRejected, ingest_archive
from tests.conftest import api_client
from tests.utils.archives import dataset_members, write_zip
from tests.utils.data import animals_zip

STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(params=STORES)
def store_settings(request: pytest.FixtureRequest, make_settings):
    if request.param == "postgresql":
        return make_settings(database_url=request.getfixturevalue("pg_url"))
    return make_settings()


def test_huge_offset_is_422_not_an_integer_overflow(store_settings) -> None:
    with api_client(store_settings) as c:
        for path in ("/v1/datasets", "/v1/jobs", "/v1/models"):
            r = c.get(path, params={"offset": 2**63})
            assert r.status_code == 422 and "offset" in r.text, (path, r.status_code)


def test_nul_byte_in_the_url_is_400(store_settings) -> None:
    with api_client(store_settings) as c:
        for path in ("/v1/datasets/%00x", "/v1/jobs/a%00", "/v1/models/%00", "/v1/models/%00/predict"):
            r = c.get(path) if not path.endswith("predict") else c.post(path, files={"files": ("a", b"x")})
            assert r.status_code == 400 and "NUL" in r.json()["detail"], (path, r.status_code, r.text)
        assert c.get("/v1/jobs", params={"status": "queued\x00"}).status_code == 400


def test_nul_byte_in_body_strings_is_422(store_settings) -> None:
    with api_client(store_settings, enqueue=lambda _job_id: None) as c:
        r = c.post("/v1/jobs", json={"dataset_id": "\x00abc"})
        assert r.status_code == 422 and "dataset_id" in r.text
        r = c.post("/v1/datasets", data={"name": "a\x00b"},
                   files={"file": ("a.zip", animals_zip(2, 2), "application/zip")})
        assert r.status_code == 422 and "name" in r.text
        r = c.post("/v1/datasets", headers={"Idempotency-Key": "k\x00"},
                   files={"file": ("a.zip", animals_zip(2, 2), "application/zip")})
        assert r.status_code == 422 and "Idempotency-Key" in r.text


@pytest.mark.parametrize("filename", ["a\x00b.zip", "x" * 1000 + ".zip"])
def test_dataset_named_after_any_upload_filename(store_settings, filename: str) -> None:
    with api_client(store_settings) as c:
        r = c.post("/v1/datasets", files={"file": (filename, animals_zip(2, 2), "application/zip")})
        assert r.status_code == 201, r.text
        name = r.json()["name"]
        assert "\x00" not in name and 0 < len(name) <= 255


def test_zip_member_offset_before_the_file_start_is_400(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "a.zip", dataset_members({"cat": 2, "dog": 2}))
    raw = bytearray(src.read_bytes())
    # Overstate where the central directory starts: zipfile takes the difference for bytes
    # prepended to the archive and shifts every member's offset down, the first one below 0.
    end = raw.rindex(b"PK\x05\x06")
    declared = int.from_bytes(raw[end + 16: end + 20], "little")
    raw[end + 16: end + 20] = (declared + 1000).to_bytes(4, "little")
    src.write_bytes(bytes(raw))
    with zipfile.ZipFile(src) as zf:
        assert zf.infolist()[0].header_offset < 0  # the damage is where intended

    (tmp_path / "datasets").mkdir()
    with pytest.raises(DatasetRejected) as info:
        ingest_archive(src, "a.zip", tmp_path / "datasets" / "ds")
    assert info.value.status == 400 and "cat/0.png" in info.value.message
    assert list((tmp_path / "datasets").iterdir()) == []
