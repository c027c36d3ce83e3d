"""service.ingest on real archives: what is accepted, what is refused and with which status."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import threading
import unicodedata
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.ingest import DatasetRejected, IngestLimits, IngestResult, detect_format, ingest_archive
from service.ingest import dataset as ingest_dataset
from tests.utils.archives import (
    Members,
    dataset_members,
    noise_image,
    png_header_bomb,
    tar_file,
    tar_special,
    write_tar,
    write_zip,
    zip_symlink,
)

FORMATS = ["zip", "tar", "tar.gz"]
SUFFIX = {"zip": ".zip", "tar": ".tar", "tar.gz": ".tar.gz"}
TWO_CLASSES = {"cat": 2, "dog": 2}


def build(tmp_path: Path, fmt: str, members: Members, name: str = "upload") -> Path:
    """Write ``members`` as a real archive of format ``fmt`` under ``tmp_path/uploads``."""
    (tmp_path / "uploads").mkdir(exist_ok=True)
    path = tmp_path / "uploads" / f"{name}{SUFFIX[fmt]}"
    if fmt == "zip":
        return write_zip(path, members)
    return write_tar(path, members, gz=fmt == "tar.gz")


def dest_for(tmp_path: Path) -> Path:
    # The datasets root exists in production (Settings.ensure_dirs); leftovers would show up in it.
    root = tmp_path / "datasets"
    root.mkdir(exist_ok=True)
    return root / "ds1"


def ingest(src: Path, tmp_path: Path, limits: IngestLimits | None = None, **kwargs) -> IngestResult:
    dest = dest_for(tmp_path)
    result = ingest_archive(src, src.name, dest, limits or IngestLimits(), **kwargs)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ds1"], "temp folders left next to dest"
    return result


def assert_nothing_left(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    assert not (root / "ds1").exists()
    assert list(root.iterdir()) == [], f"leftovers: {list(root.iterdir())}"
    # Nothing escaped next to the upload or the datasets root either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datasets", "uploads"]


def rejected(
    src: Path, tmp_path: Path, limits: IngestLimits | None = None, *, status: int, **kwargs
) -> DatasetRejected:
    dest = dest_for(tmp_path)
    with pytest.raises(DatasetRejected) as info:
        ingest_archive(src, src.name, dest, limits or IngestLimits(), **kwargs)
    assert_nothing_left(tmp_path)
    assert info.value.status == status, info.value.message
    assert str(info.value) == info.value.message
    return info.value


def files_under(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- accepted uploads


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_archive_is_stored_flat_per_class(tmp_path: Path, fmt: str) -> None:
    members = dataset_members({"cat": 2, "dog": 3}) | dataset_members({"cat": 1}, fmt="JPEG")
    src = build(tmp_path, fmt, members)

    result = ingest(src, tmp_path)

    assert result == IngestResult(classes=["cat", "dog"], counts={"cat": 3, "dog": 3}, num_images=6, skipped=[])
    assert files_under(tmp_path / "datasets" / "ds1") == members


def test_single_wrapping_folder_is_stripped(tmp_path: Path) -> None:
    members = dataset_members(TWO_CLASSES, prefix="animals/") | {
        "animals/": None,
        "animals/README.txt": b"my dataset",
    }
    src = build(tmp_path, "zip", members)

    result = ingest(src, tmp_path)

    assert result.classes == ["cat", "dog"]
    assert result.skipped == [{"file": "animals/README.txt", "reason": "not inside a class folder"}]
    stored = files_under(tmp_path / "datasets" / "ds1")
    assert sorted(stored) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert stored["dog/1.png"] == members["animals/dog/1.png"]


def test_os_junk_and_root_files_are_skipped_and_listed(tmp_path: Path) -> None:
    junk = {
        "__MACOSX/cat/._0.png": b"\x00\x05\x16\x07 appledouble",
        "cat/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "dog/Thumbs.db": b"\xd0\xcf\x11\xe0",
        ".git/config": b"[core]",
        "notes.txt": b"root file",
        "cat/.hidden.png": noise_image(),
    }
    src = build(tmp_path, "zip", dataset_members(TWO_CLASSES) | junk)

    result = ingest(src, tmp_path)

    assert result.counts == {"cat": 2, "dog": 2}
    assert sorted((s["file"], s["reason"]) for s in result.skipped) == [
        (".git/config", "inside hidden folder '.git'"),
        ("__MACOSX/cat/._0.png", "macOS metadata (__MACOSX)"),
        ("cat/.DS_Store", "hidden file"),
        ("cat/.hidden.png", "hidden file"),
        ("dog/Thumbs.db", "OS junk file (Thumbs.db)"),
        ("notes.txt", "not inside a class folder"),
    ]
    assert sorted(files_under(tmp_path / "datasets" / "ds1")) == [
        "cat/0.png",
        "cat/1.png",
        "dog/0.png",
        "dog/1.png",
    ]


def test_tar_made_with_dot_prefix_and_directory_entries(tmp_path: Path) -> None:
    # What `tar -cf data.tar .` produces: a "./" root entry and "./" on every name.
    members = {"./": None, "./cat/": None, "./dog/": None} | dataset_members(TWO_CLASSES, prefix="./")
    src = build(tmp_path, "tar", members)

    result = ingest(src, tmp_path)

    assert result.counts == {"cat": 2, "dog": 2}
    assert "cat/0.png" in files_under(tmp_path / "datasets" / "ds1")


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_class_names_are_nfc_normalized(tmp_path: Path, fmt: str) -> None:
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café"
    src = build(tmp_path, fmt, dataset_members({decomposed: 2, "dog": 2}))

    result = ingest(src, tmp_path)

    assert result.classes == ["café", "dog"]
    assert result.counts["café"] == 2
    assert (tmp_path / "datasets" / "ds1" / "café" / "0.png").is_file()


def test_every_supported_image_type_is_accepted_by_content(tmp_path: Path) -> None:
    members = {
        f"cat/pic.{fmt.lower()}": noise_image(fmt, seed=i)
        for i, fmt in enumerate(["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
    }
    members["dog/png-named.jpg"] = noise_image("PNG", seed=10)  # the extension lies; content decides
    members["dog/no-extension"] = noise_image("JPEG", seed=11)

    result = ingest(build(tmp_path, "zip", members), tmp_path)

    assert result.counts == {"cat": 6, "dog": 2}
    assert result.skipped == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_is_detected_by_magic_bytes_not_by_name(tmp_path: Path, fmt: str) -> None:
    src = build(tmp_path, fmt, dataset_members(TWO_CLASSES))
    misnamed = src.rename(src.with_name("dataset.rar"))

    assert detect_format(misnamed, "dataset.rar") == fmt
    assert ingest(misnamed, tmp_path).num_images == 4


# --------------------------------------------------------------------------- not an archive (400)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(random.Random(7).randbytes(4096), "not a supported archive", id="random-bytes"),
        pytest.param(noise_image("PNG"), "PNG image", id="plain-png"),
        pytest.param(noise_image("JPEG"), "JPEG image", id="plain-jpeg"),
        pytest.param(b"", "is empty", id="empty"),
        pytest.param(gzip.compress(b"just some text\n" * 100), "does not contain a tar", id="gzip-not-tar"),
        pytest.param(b"\x1f\x8b\x08\x00garbage", "corrupt gzip", id="corrupt-gzip"),
        pytest.param(b"Rar!\x1a\x07\x01\x00" + bytes(100), "RAR archive", id="rar"),
    ],
)
def test_non_archive_upload_is_400(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "uploads").mkdir()
    src = tmp_path / "uploads" / "data.zip"
    src.write_bytes(content)

    err = rejected(src, tmp_path, status=400)

    assert expected in err.message
    assert "'data.zip'" in err.message


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_archive_is_400(tmp_path: Path, fmt: str) -> None:
    src = build(tmp_path, fmt, dataset_members({"cat": 3, "dog": 3}))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])

    err = rejected(src, tmp_path, status=400)

    assert "corrupt" in err.message and fmt in err.message


def test_encrypted_zip_member_is_400(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    src = write_zip(tmp_path / "uploads" / "enc.zip", dataset_members(TWO_CLASSES))
    raw = bytearray(src.read_bytes())
    # Set the "encrypted" flag in the central directory entry of the first member.
    central = raw.index(b"PK\x01\x02")
    raw[central + 8] |= 0x01
    src.write_bytes(bytes(raw))

    err = rejected(src, tmp_path, status=400)

    assert "cat/0.png" in err.message and "encrypted" in err.message


# --------------------------------------------------------------------------- unsafe members (422)


UNSAFE_NAMES = [
    pytest.param("zip", "../evil.png", "'..'", id="zip-parent"),
    pytest.param("zip", "cat/../../evil.png", "'..'", id="zip-nested-parent"),
    pytest.param("zip", "/etc/evil.png", "absolute path", id="zip-absolute"),
    pytest.param("zip", "C:/evil.png", "drive letter", id="zip-drive"),
    pytest.param("zip", "C:\\evil.png", "backslash", id="zip-drive-backslash"),
    pytest.param("zip", "\\\\server\\share\\evil.png", "backslash", id="zip-unc"),
    pytest.param("zip", "cat\\..\\..\\evil.png", "backslash", id="zip-backslash-parent"),
    pytest.param("zip", "cat/evil\x00.png", "NUL byte", id="zip-nul"),
    pytest.param("zip", "cat/evil\u202egnp.exe", "control characters", id="zip-bidi-override"),
    pytest.param("tar", "../evil.png", "'..'", id="tar-parent"),
    pytest.param("tar", "/etc/evil.png", "absolute path", id="tar-absolute"),
    pytest.param("tar", "cat\\..\\..\\evil.png", "backslash", id="tar-backslash"),
    pytest.param("tar", "cat/evil\x00.png", "NUL byte", id="tar-nul-via-pax"),
    pytest.param("tar.gz", "cat/../../../evil.png", "'..'", id="targz-parent"),
]


@pytest.mark.parametrize(("fmt", "name", "reason"), UNSAFE_NAMES)
def test_unsafe_member_name_refuses_the_whole_upload(tmp_path: Path, fmt: str, name: str, reason: str) -> None:
    (tmp_path / "uploads").mkdir()
    path = tmp_path / "uploads" / f"bad{SUFFIX[fmt]}"
    good = dataset_members({"cat": 3, "dog": 3})
    if fmt == "zip":
        info = zipfile.ZipInfo("placeholder")
        info.filename = info.orig_filename = name  # ZipInfo() would cut at a NUL byte
        src = write_zip(path, good, extra=[(info, noise_image())])
    else:
        src = write_tar(path, good, gz=fmt == "tar.gz", extra=[tar_file(name, noise_image())])

    err = rejected(src, tmp_path, status=422)

    assert repr(name) in err.message
    assert reason in err.message
    assert err.problems == [{"file": name, "reason": err.problems[0]["reason"]}]
    assert not list(tmp_path.rglob("evil*"))


@pytest.mark.parametrize(
    ("kind", "linkname", "reason"),
    [
        pytest.param(tarfile.SYMTYPE, "/etc/passwd", "symbolic link", id="symlink"),
        pytest.param(tarfile.SYMTYPE, "../../outside", "symbolic link", id="symlink-relative"),
        pytest.param(tarfile.LNKTYPE, "cat/0.png", "hard link", id="hardlink-inside"),
        pytest.param(tarfile.LNKTYPE, "/etc/shadow", "hard link", id="hardlink-outside"),
        pytest.param(tarfile.FIFOTYPE, "", "FIFO", id="fifo"),
        pytest.param(tarfile.CHRTYPE, "", "device file", id="char-device"),
        pytest.param(tarfile.BLKTYPE, "", "device file", id="block-device"),
    ],
)
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_tar_links_and_special_files_are_refused(
    tmp_path: Path, kind: bytes, linkname: str, reason: str, gz: bool
) -> None:
    (tmp_path / "uploads").mkdir()
    src = write_tar(
        tmp_path / "uploads" / "bad.tar",
        dataset_members({"cat": 2, "dog": 2}),
        gz=gz,
        extra=[tar_special("dog/sneaky.png", kind, linkname)],
    )

    err = rejected(src, tmp_path, status=422)

    assert "'dog/sneaky.png'" in err.message and reason in err.message
    assert err.problems[0]["file"] == "dog/sneaky.png"


def test_zip_symlink_entry_is_refused(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    src = write_zip(
        tmp_path / "uploads" / "link.zip",
        dataset_members(TWO_CLASSES),
        extra=[zip_symlink("cat/passwd.png", "/etc/passwd")],
    )

    err = rejected(src, tmp_path, status=422)

    assert "'cat/passwd.png'" in err.message and "symbolic link" in err.message


def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    src = tmp_path / "uploads" / "dup.zip"
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_zip(src, dataset_members(TWO_CLASSES), extra=[(zipfile.ZipInfo("cat/0.png"), noise_image())])

    err = rejected(src, tmp_path, status=422)

    assert "'cat/0.png'" in err.message and "more than once" in err.message


# --------------------------------------------------------------------------- bombs and caps (413)


@pytest.fixture(scope="module")
def zeros_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real images plus ``cat/zeros.png``: 60 MiB of zeros deflated to ~60 KiB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    write_zip(path, dataset_members(TWO_CLASSES))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("cat/zeros.png", "w") as out:
        block = bytes(1024 * 1024)
        for _ in range(60):
            out.write(block)
    assert path.stat().st_size < 200_000
    return path


def copy_upload(tmp_path: Path, src: Path) -> Path:
    (tmp_path / "uploads").mkdir(exist_ok=True)
    dst = tmp_path / "uploads" / src.name
    dst.write_bytes(src.read_bytes())
    return dst


def test_zip_bomb_trips_the_ratio_cap(tmp_path: Path, zeros_zip: Path) -> None:
    src = copy_upload(tmp_path, zeros_zip)

    err = rejected(src, tmp_path, IngestLimits(max_file_bytes=100 * 1024**2), status=413)

    assert "200x" in err.message and "zip bomb" in err.message and "cat/zeros.png" in err.message


def test_zip_bomb_trips_the_total_bytes_cap(tmp_path: Path, zeros_zip: Path) -> None:
    src = copy_upload(tmp_path, zeros_zip)
    limits = IngestLimits(max_file_bytes=100 * 1024**2, max_total_bytes=10 * 1024**2, max_ratio=1e9)

    err = rejected(src, tmp_path, limits, status=413)

    assert "more than 10.0 MiB" in err.message and "total uncompressed size" in err.message


def test_member_over_the_per_file_cap_is_413(tmp_path: Path, zeros_zip: Path) -> None:
    src = copy_upload(tmp_path, zeros_zip)

    err = rejected(src, tmp_path, status=413)  # default 50 MiB per file

    assert "'cat/zeros.png'" in err.message and "50.0 MiB" in err.message


def test_tar_gz_bomb_in_a_skipped_member_still_counts(tmp_path: Path) -> None:
    # Junk is never written, but gzip still has to inflate it to get past it.
    (tmp_path / "uploads").mkdir()
    src = write_tar(
        tmp_path / "uploads" / "bomb.tar.gz",
        dataset_members(TWO_CLASSES),
        gz=True,
        extra=[tar_file("__MACOSX/._zeros", bytes(20 * 1024**2))],
    )

    err = rejected(src, tmp_path, status=413)

    assert "200x" in err.message


def test_oversized_tar_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # tarfile reads a pax header in one go; a 9 MiB one must not be slurped into memory.
    (tmp_path / "uploads").mkdir()
    info, data = tar_file("cat/2.png", noise_image())
    info.pax_headers = {"comment": "x" * (9 * 1024**2)}
    src = write_tar(tmp_path / "uploads" / "pax.tar", dataset_members(TWO_CLASSES), extra=[(info, data)])

    err = rejected(src, tmp_path, status=400)

    assert "oversized tar header" in err.message


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_many_members_is_413(tmp_path: Path, fmt: str) -> None:
    src = build(tmp_path, fmt, dataset_members({"cat": 3, "dog": 3}))

    err = rejected(src, tmp_path, IngestLimits(max_members=5), status=413)

    if fmt == "zip":  # the central directory gives the count before anything is read
        assert err.message == "the archive has 6 entries (files and folders); the limit is 5"
    else:
        assert err.message == "the archive has more than 5 entries (files and folders)"


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        pytest.param((8000, 8000), "8000x8000 = 64000000 pixels (limit 40000000", id="over-our-limit"),
        pytest.param((20000, 20000), "exceeds limit of", id="over-pil-hard-limit"),
    ],
)
def test_pixel_bomb_is_refused_from_its_header(tmp_path: Path, size: tuple[int, int], reason: str) -> None:
    bomb = png_header_bomb(*size)
    assert len(bomb) < 100_000
    src = build(tmp_path, "zip", dataset_members(TWO_CLASSES) | {"dog/huge.png": bomb})

    err = rejected(src, tmp_path, status=422)  # the real default limit of 40 Mpx

    assert err.problems == [{"file": "dog/huge.png", "reason": err.problems[0]["reason"]}]
    assert "image too large" in err.problems[0]["reason"] and reason in err.problems[0]["reason"]
    assert "dog/huge.png" in err.message


def test_image_check_leaves_other_threads_warning_filters_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # warnings.catch_warnings swaps the process-wide filter list: a predict request decoding in
    # another thread at the same moment would run under (or restore) the wrong filters.
    from PIL import Image

    path = tmp_path / "a.png"
    path.write_bytes(noise_image("PNG"))
    inside, release = threading.Event(), threading.Event()
    real_open = Image.open

    def paused_open(*args, **kwargs):
        inside.set()
        release.wait(10)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", paused_open)
    filters, snapshot = warnings.filters, list(warnings.filters)
    with ThreadPoolExecutor(1) as pool:
        checked = pool.submit(ingest_dataset._image_problem, path, 1000)
        assert inside.wait(10)
        seen, seen_items = warnings.filters, list(warnings.filters)
        release.set()
        assert checked.result() is None
    assert seen is filters and seen_items == snapshot


def test_pixel_limit_applies_to_every_image(tmp_path: Path) -> None:
    src = build(tmp_path, "tar", dataset_members(TWO_CLASSES))

    err = rejected(src, tmp_path, IngestLimits(max_image_pixels=255), status=422)

    assert len(err.problems) == 4
    assert all("16x16 = 256 pixels (limit 255" in p["reason"] for p in err.problems)


# --------------------------------------------------------------------------- bad images


def truncated_jpeg() -> bytes:
    data = noise_image("JPEG", size=(64, 64), seed=99)
    return data[: len(data) // 2]


def test_bad_images_reject_the_upload_listing_every_one(tmp_path: Path) -> None:
    bad = {
        "cat/notes.jpg": b"this is text, not a JPEG\n" * 20,
        "dog/half.jpg": truncated_jpeg(),
        "dog/empty.png": b"",
    }
    src = build(tmp_path, "zip", dataset_members({"cat": 2, "dog": 2}) | bad)

    err = rejected(src, tmp_path, status=422)

    reasons = {p["file"]: p["reason"] for p in err.problems}
    assert sorted(reasons) == ["cat/notes.jpg", "dog/empty.png", "dog/half.jpg"]
    assert reasons["cat/notes.jpg"] == "not an image (cannot identify image file)"
    assert reasons["dog/empty.png"] == "not an image (cannot identify image file)"
    assert reasons["dog/half.jpg"].startswith("corrupt image") and "truncated" in reasons["dog/half.jpg"]
    assert "3 file(s)" in err.message and "cat/notes.jpg" in err.message and "dog/half.jpg" in err.message
    assert "/tmp" not in str(err.problems) and ".incoming" not in err.message


def test_skip_keeps_good_images_and_lists_the_bad(tmp_path: Path) -> None:
    bad = {
        "cat/notes.jpg": b"plain text",
        "dog/half.jpg": truncated_jpeg(),
        "dog/huge.png": png_header_bomb(8000, 8000),
    }
    good = dataset_members({"cat": 2, "dog": 3})
    src = build(tmp_path, "tar.gz", good | bad)

    result = ingest(src, tmp_path, on_bad_file="skip")

    assert result.counts == {"cat": 2, "dog": 3} and result.num_images == 5
    assert sorted(s["file"] for s in result.skipped) == sorted(bad)
    assert files_under(tmp_path / "datasets" / "ds1") == good


def test_skipping_bad_files_can_still_leave_too_few_images(tmp_path: Path) -> None:
    src = build(tmp_path, "zip", dataset_members({"cat": 2, "dog": 1}) | {"dog/bad.jpg": b"nope"})

    err = rejected(src, tmp_path, status=422, on_bad_file="skip")

    assert "dog (1)" in err.message


# --------------------------------------------------------------------------- dataset shape (422)


def test_one_class_is_not_a_dataset(tmp_path: Path) -> None:
    src = build(tmp_path, "zip", dataset_members({"cat": 3}))

    err = rejected(src, tmp_path, status=422)

    assert err.message == "need at least 2 classes, found 1: cat"


def test_archive_without_class_folders(tmp_path: Path) -> None:
    src = build(tmp_path, "tar", {"a.png": noise_image(), "b.png": noise_image(seed=2)})

    err = rejected(src, tmp_path, status=422)

    assert err.message.startswith("need at least 2 classes, found 0")


def test_class_with_too_few_images_is_named(tmp_path: Path) -> None:
    src = build(tmp_path, "zip", dataset_members({"cat": 3, "dog": 1, "owl": 2}))

    err = rejected(src, tmp_path, status=422)

    assert "at least 2 images" in err.message and "dog (1)" in err.message and "owl" not in err.message
    assert err.problems == [{"file": "dog/", "reason": "1 usable image(s)"}]


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_empty_class_folder_counts_as_a_class_with_zero_images(tmp_path: Path, fmt: str) -> None:
    src = build(tmp_path, fmt, dataset_members(TWO_CLASSES) | {"bird/": None})

    err = rejected(src, tmp_path, status=422)

    assert "bird (0)" in err.message


@pytest.mark.parametrize(
    ("prefix", "deep"),
    [
        pytest.param("", "cat/extra/deep.png", id="no-wrapper"),
        pytest.param("animals/", "animals/cat/extra/deep.png", id="below-wrapper"),
        pytest.param("", "cat/a/b/c/deep.png", id="very-deep"),
    ],
)
def test_folders_nested_too_deeply_are_refused(tmp_path: Path, prefix: str, deep: str) -> None:
    members = dataset_members({"cat": 2, "dog": 2}, prefix=prefix) | {deep: noise_image(seed=7)}
    src = build(tmp_path, "zip", members)

    err = rejected(src, tmp_path, status=422)

    assert "nested too deeply" in err.message and repr(deep) in err.message
    assert {"file": deep, "reason": err.problems[0]["reason"]} in err.problems


def test_overlong_class_name_is_refused(tmp_path: Path) -> None:
    long_name = "c" * 101
    src = build(tmp_path, "zip", dataset_members({long_name: 2, "dog": 2}))

    err = rejected(src, tmp_path, status=422)

    assert "at most 100 characters" in err.message and long_name in err.message


# --------------------------------------------------------------------------- the destination


def test_existing_destination_is_left_alone(tmp_path: Path) -> None:
    src = build(tmp_path, "zip", dataset_members(TWO_CLASSES))
    dest = dest_for(tmp_path)
    dest.mkdir()
    (dest / "keep.txt").write_text("someone else's")

    with pytest.raises(FileExistsError):
        ingest_archive(src, src.name, dest)

    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert [p.name for p in dest.parent.iterdir()] == ["ds1"]


def test_unexpected_error_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = build(tmp_path, "tar.gz", dataset_members(TWO_CLASSES))
    calls: list[Path] = []

    def explode(path: Path, max_pixels: int) -> str | None:
        calls.append(path)
        if len(calls) == 3:  # after files were written to the staging folder
            raise RuntimeError("disk on fire")
        return None

    monkeypatch.setattr(ingest_dataset, "_image_problem", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ingest_archive(src, src.name, dest_for(tmp_path))

    assert calls and calls[0].exists() is False  # the staged file went with the temp folder
    assert_nothing_left(tmp_path)


def test_dest_parent_is_created(tmp_path: Path) -> None:
    src = build(tmp_path, "zip", dataset_members(TWO_CLASSES))
    dest = tmp_path / "new" / "root" / "ds"

    ingest_archive(src, src.name, dest)

    assert sorted(p.name for p in dest.iterdir()) == ["cat", "dog"]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_members"):
        IngestLimits(max_members=0)


def test_builders_make_real_archives(tmp_path: Path) -> None:
    # Guards the builders themselves: the standard library reads what they write.
    src = build(tmp_path, "tar.gz", dataset_members(TWO_CLASSES))
    with tarfile.open(src) as tf:
        assert sorted(tf.getnames()) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    with zipfile.ZipFile(build(tmp_path, "zip", dataset_members(TWO_CLASSES))) as zf:
        assert zf.testzip() is None
    assert io.BytesIO(noise_image("JPEG")).read(3) == b"\xff\xd8\xff"
