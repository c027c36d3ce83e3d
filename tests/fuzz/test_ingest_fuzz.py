"""Property-based fuzzing of ``service.ingest.ingest_archive``.

Whatever the upload (random bytes, a damaged real archive, hostile member names, links and
device entries), the reader either stores a dataset whose every file lies inside ``dest`` or
raises ``DatasetRejected`` with 400, 413 or 422, leaving nothing on disk. Any other exception
is a bug.
"""

from __future__ import annotations

import functools
import io
import re
import stat
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from service.ingest import DatasetRejected, IngestLimits, IngestResult, ingest_archive
from tests.fuzz.conftest import fuzz_settings
from tests.utils.archives import dataset_members, noise_image, png_header_bomb, write_tar, write_zip

FORMATS = ("zip", "tar", "tar.gz")
# Small caps, so that bombs and floods trip them within a few hundred kilobytes.
LIMITS = IngestLimits(
    max_members=16,
    max_total_bytes=512 * 1024,
    max_file_bytes=256 * 1024,
    max_ratio=50.0,
    max_image_pixels=64 * 64,
    min_classes=2,
    min_images_per_class=1,
)


def check_ingest(data: bytes, limits: IngestLimits = LIMITS) -> IngestResult | DatasetRejected:
    """Ingest ``data`` in a fresh folder and assert the contract, whichever way it goes."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "upload.bin"
        src.write_bytes(data)
        datasets = root / "datasets"
        datasets.mkdir()
        dest = datasets / "ds"
        try:
            result = ingest_archive(src, "upload.bin", dest, limits)
        except DatasetRejected as exc:
            assert exc.status in (400, 413, 422), (exc.status, exc.message)
            assert exc.message and str(exc) == exc.message
            assert list(datasets.iterdir()) == [], "leftovers beside dest after a rejection"
            outcome: IngestResult | DatasetRejected = exc
        else:
            assert_valid_dataset(dest, result)
            assert [p.name for p in datasets.iterdir()] == ["ds"], "leftovers beside dest"
            outcome = result
        # Nothing was written outside the datasets folder (the upload is the only other file).
        assert sorted(p.name for p in root.iterdir()) == ["datasets", "upload.bin"]
        return outcome


def assert_valid_dataset(dest: Path, result: IngestResult) -> None:
    inside = dest.resolve()
    classes = []
    for class_dir in sorted(dest.iterdir()):
        assert class_dir.is_dir() and not class_dir.is_symlink(), class_dir
        classes.append(class_dir.name)
        files = list(class_dir.iterdir())
        for f in files:
            assert f.is_file() and not f.is_symlink(), f
            assert f.resolve().is_relative_to(inside), f
            assert f.stat().st_nlink == 1, f"{f} is hard-linked"
        assert result.counts[class_dir.name] == len(files)
    assert sorted(result.classes) == classes == sorted(result.counts)
    assert result.num_images == sum(result.counts.values())
    assert len(result.classes) >= LIMITS.min_classes


# --------------------------------------------------------------------------- random bytes


MAGIC = [b"", b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b\x08\x00", b"\x89PNG\r\n\x1a\n", b"BZh", b"\x00" * 512]


@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=2048))
@fuzz_settings(60)
def test_random_bytes_are_refused_cleanly(prefix: bytes, body: bytes) -> None:
    assert isinstance(check_ingest(prefix + body), DatasetRejected)


# --------------------------------------------------------------------------- damaged real archives


@functools.cache
def valid_archive(fmt: str) -> bytes:
    """A small, valid dataset archive of ``fmt`` (built once)."""
    members = dataset_members({"cat": 2, "dog": 2}, prefix="set/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a"
        if fmt == "zip":
            write_zip(path, members)
        else:
            write_tar(path, members, gz=fmt == "tar.gz")
        return path.read_bytes()


def _flip(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    out = bytearray(data)
    for pos, bit in zip(positions, bits, strict=False):
        out[pos % len(out)] ^= 1 << bit
    return bytes(out)


@st.composite
def mutated_archives(draw: st.DrawFn) -> bytes:
    # Some draws change nothing (a truncation at the full length, an empty duplicated range): those
    # must be accepted like the unmutated archive.
    data = valid_archive(draw(st.sampled_from(FORMATS)))
    n = len(data)
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "overwrite", "duplicate", "combo"]))
    if kind in ("flip", "combo"):
        k = draw(st.integers(1, 8))
        data = _flip(data, draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k)),
                     draw(st.lists(st.integers(0, 7), min_size=k, max_size=k)))
    if kind in ("truncate", "combo"):
        data = data[: draw(st.integers(0, len(data)))]
    if kind == "splice":  # insert foreign bytes, or a piece of another archive
        at = draw(st.integers(0, n))
        other = valid_archive(draw(st.sampled_from(FORMATS)))
        start = draw(st.integers(0, len(other)))
        piece = draw(st.one_of(st.binary(min_size=1, max_size=512), st.just(other[start:start + 700])))
        data = data[:at] + piece + data[at:]
    if kind == "overwrite":  # e.g. a size or offset field replaced by garbage
        at = draw(st.integers(0, n - 1))
        data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at + 16:]
    if kind == "duplicate":  # a byte range repeated
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a, min(n, a + 2048)))
        data = data[:b] + data[a:b] + data[b:]
    return data


def test_unmutated_archives_are_accepted() -> None:
    for fmt in FORMATS:
        result = check_ingest(valid_archive(fmt))
        assert isinstance(result, IngestResult) and result.counts == {"cat": 2, "dog": 2}, fmt


@given(data=mutated_archives())
@example(data=valid_archive("zip")).via("an unmutated archive")
@example(data=valid_archive("tar")).via("an unmutated archive")
@example(data=valid_archive("tar.gz")).via("an unmutated archive")
@fuzz_settings(150)
def test_damaged_archives_are_stored_or_refused_cleanly(data: bytes) -> None:
    outcome = check_ingest(data)
    if data in {valid_archive(fmt) for fmt in FORMATS}:  # the mutation changed nothing
        assert isinstance(outcome, IngestResult), outcome
        assert outcome.counts == {"cat": 2, "dog": 2}


# --------------------------------------------------------------------------- hostile members


SEGMENTS = st.one_of(
    st.sampled_from(["cat", "dog", "set", ".", "..", "", "...", ".hidden", "__MACOSX", "Thumbs.db", "C:", "c:\\x",
                     "a\\..\\b", "..\\..", "caf\u00e9", "cafe\u0301", "\u202eevil", "nul\x00byte", "x" * 300,
                     "\u00e9" * 130, "\U0001f431", "a\tb", "con", "img.png"]),
    st.text(min_size=1, max_size=12),
)
NAMES = st.one_of(
    st.lists(SEGMENTS, min_size=1, max_size=5).map("/".join),
    st.lists(SEGMENTS, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.lists(SEGMENTS, min_size=1, max_size=3).map(lambda p: "\\".join(p)),
    st.sampled_from(["cat/1.png", "dog/1.png", "set/cat/2.png", "cat/", "../cat/1.png", "/etc/passwd",
                     "cat/../../x.png", "./cat/3.png", "cat//4.png"]),
)
PAYLOADS = st.one_of(
    st.integers(0, 50).map(lambda seed: noise_image(seed=seed, size=(8, 8))),
    st.sampled_from(["JPEG", "BMP", "GIF"]).map(lambda fmt: noise_image(fmt, size=(8, 8))),
    st.just(png_header_bomb(3000, 3000)),
    st.integers(1, 400).map(lambda kib: b"\x00" * (kib * 1024)),  # compresses to almost nothing
    st.binary(max_size=64),
    st.just(noise_image(seed=1, size=(8, 8))[:40]),  # a truncated PNG
)
TAR_KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
             tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"V", b"Z"]
ZIP_MODES = [0, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o600,
             stat.S_IFBLK | 0o600, stat.S_IFIFO | 0o600, stat.S_IFSOCK | 0o600]


@st.composite
def hostile_members(draw: st.DrawFn) -> list[tuple[str, int, bytes]]:
    """Entries ``(name, kind index, payload)``: a valid core plus a few hostile ones, shuffled."""
    core = [(f"{c}/{i}.png", 0, noise_image(seed=10 * j + i, size=(8, 8)))
            for j, c in enumerate(("cat", "dog")) for i in range(draw(st.integers(0, 2)))]
    kinds = st.sampled_from([0] * 8 + list(range(len(TAR_KINDS))))  # mostly regular files
    extra = draw(st.lists(st.tuples(NAMES, kinds, PAYLOADS), max_size=6))
    return draw(st.permutations(core + extra))


def _tar_bytes(entries: list[tuple[str, int, bytes]], gz: bool, link_target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            if "\x00" in name:
                info.pax_headers = {"path": name}
            info.type = TAR_KINDS[kind % len(TAR_KINDS)]
            if info.type in (tarfile.REGTYPE, tarfile.CONTTYPE, b"Z"):
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = link_target
                if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    info.devmajor, info.devminor = 1, 3
                tf.addfile(info)
    return buf.getvalue()


def _zip_bytes(entries: list[tuple[str, int, bytes]], link_target: str) -> bytes:
    buf = io.BytesIO()
    # zipfile warns about duplicate names, which are part of the fuzz.
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")
        for name, kind, payload in entries:
            info = zipfile.ZipInfo("placeholder")
            info.filename = info.orig_filename = name  # ZipInfo() would cut the name at a NUL byte
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = ZIP_MODES[kind % len(ZIP_MODES)]
            if mode:
                info.create_system = 3
                info.external_attr = mode << 16
            zf.writestr(info, link_target.encode() if stat.S_ISLNK(mode) else payload)
    return buf.getvalue()


def _is_regular(fmt: str, kind: int) -> bool:
    if fmt == "zip":
        return ZIP_MODES[kind % len(ZIP_MODES)] in (0, stat.S_IFREG | 0o644)
    return TAR_KINDS[kind % len(TAR_KINDS)] in (tarfile.REGTYPE, tarfile.CONTTYPE)


# Every payload the strategies draw that is a whole, small PNG (the core's and PAYLOADS' noise images).
SMALL_PNGS = frozenset(noise_image(seed=seed, size=(8, 8)) for seed in range(51))


def _honest_counts(entries: list[tuple[str, int, bytes]]) -> dict[str, int] | None:
    """Per-class counts when ``entries`` are only the valid core (no hostile entry drawn), else None."""
    names = [name for name, _, _ in entries]
    honest = len(set(names)) == len(names) and all(
        kind == 0 and re.fullmatch(r"(cat|dog)/[0-9]+\.png", name) and payload in SMALL_PNGS
        for name, kind, payload in entries
    )
    counts = {c: sum(name.startswith(c + "/") for name in names) for c in ("cat", "dog")}
    return counts if honest and min(counts.values()) >= LIMITS.min_images_per_class else None


CORE = [("cat/0.png", 0, noise_image(seed=0, size=(8, 8))), ("dog/0.png", 0, noise_image(seed=10, size=(8, 8))),
        ("dog/1.png", 0, noise_image(seed=11, size=(8, 8)))]


@given(
    fmt=st.sampled_from(FORMATS),
    entries=hostile_members(),
    link_target=st.sampled_from(["/etc/passwd", "../../outside", "cat/0.png", "", "x" * 200]),
)
@example(fmt="zip", entries=CORE, link_target="").via("no hostile entry")
@example(fmt="tar", entries=CORE, link_target="").via("no hostile entry")
@example(fmt="tar.gz", entries=CORE, link_target="").via("no hostile entry")
@fuzz_settings(150)
def test_hostile_members_are_stored_safely_or_refused(fmt: str, entries: list, link_target: str) -> None:
    data = _zip_bytes(entries, link_target) if fmt == "zip" else _tar_bytes(entries, fmt == "tar.gz", link_target)
    outcome = check_ingest(data)
    if isinstance(outcome, IngestResult):
        # Only regular files can have become images: no link, device or folder entry did.
        assert outcome.num_images <= sum(_is_regular(fmt, kind) for _, kind, _ in entries)
    honest = _honest_counts(entries)
    if honest is not None:  # nothing hostile was drawn: a plain, valid dataset
        assert isinstance(outcome, IngestResult), outcome
        assert outcome.counts == honest
