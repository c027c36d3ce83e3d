"""Turn an uploaded dataset archive into a ``<class>/<image>`` folder, or refuse it.

The HTTP layer streams the upload to a temporary file and calls :func:`ingest_archive`.
Everything here treats the archive as hostile: members are read one by one through our
own checks (never ``extractall``), every byte written is counted, no archive-controlled
name touches the file system until it has been validated, and links or device entries
are refused rather than "fixed". Files are first written under counter names in a staging
folder; the final ``<class>/<file>`` layout is built from validated names only.

Failures raise :class:`DatasetRejected`, which carries the HTTP status the caller should
answer with (400 unreadable, 413 over a size or bomb cap, 422 unacceptable content) and a
per-file ``problems`` list. The module is deliberately free of web and ML imports.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
import re
import secrets
import shutil
import stat
import struct
import tarfile
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, TypeVar, cast

from PIL import Image, UnidentifiedImageError

from models.units import format_bytes

__all__ = [
    "ArchiveFormat",
    "DatasetRejected",
    "IngestLimits",
    "IngestResult",
    "detect_format",
    "ingest_archive",
]

ArchiveFormat = Literal["zip", "tar", "tar.gz"]
_T = TypeVar("_T")

_CHUNK = 1024 * 1024
# tarfile reads a pax or GNU long-name header in one ``read`` of its declared size; a
# bigger single read than this can only be such a header, and a hostile one.
_MAX_TAR_HEADER_READ = 8 * 1024 * 1024
# Tar headers and padding on top of file data, per member, when capping the whole stream.
_TAR_OVERHEAD_PER_MEMBER = 4096
_MAX_CLASS_NAME_CHARS = 100
_MAX_NAME_BYTES = 255  # one path component, as most file systems allow
_INCOMING = ".incoming"  # staging folder inside the temp dir; dot names are never classes

# Formats PIL may even try: keeps plugins such as EPS (Ghostscript) away from uploads.
# (Multi-picture camera JPEGs open through the JPEG entry and report format "MPO".)
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
_SUPPORTED_IMAGES = "jpg, jpeg, png, bmp, gif, webp, tif, tiff"

_JUNK_DIRS = frozenset({"__macosx"})
_JUNK_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")

_NOT_ARCHIVES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"BZh", "a bzip2 file (.tar.bz2 is not supported)"),
    (b"\xfd7zXZ\x00", "an xz file (.tar.xz is not supported)"),
    (b"\x28\xb5\x2f\xfd", "a zstd file (.tar.zst is not supported)"),
)

_ZIP_SPECIAL_TYPES = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}

# What a damaged archive raises while being read; anything else is a bug and propagates.
_CORRUPT_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    gzip.BadGzipFile,
    EOFError,
    zlib.error,
    struct.error,
    NotImplementedError,  # zipfile: an unsupported compression method
)


@dataclass(frozen=True)
class IngestLimits:
    """Caps that keep a hostile or accidental archive from exhausting the server.

    Attributes:
        max_members: most entries (files and folders) an archive may list.
        max_total_bytes: most uncompressed bytes, counted as they are actually produced.
        max_file_bytes: most bytes of any single member.
        max_ratio: most uncompressed bytes per byte of archive (zip/gzip bomb guard).
        max_image_pixels: most pixels (width * height, read from the header before
            decoding) of any image (pixel bomb guard). PIL's own guard
            (``Image.MAX_IMAGE_PIXELS``, about 89 Mpx) is also enforced, so values above
            it have no further effect.
        min_classes: fewest class folders a dataset needs.
        min_images_per_class: fewest usable images each class needs.
    """

    max_members: int = 50_000
    max_total_bytes: int = 2 * 1024**3
    max_file_bytes: int = 50 * 1024**2
    max_ratio: float = 200.0
    max_image_pixels: int = 40_000_000
    min_classes: int = 2
    min_images_per_class: int = 2

    def __post_init__(self) -> None:
        for name in ("max_members", "max_total_bytes", "max_file_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"IngestLimits.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_ratio <= 0:
            raise ValueError(f"IngestLimits.max_ratio must be positive, got {self.max_ratio}")
        if self.min_classes < 1 or self.min_images_per_class < 1:
            raise ValueError("IngestLimits.min_classes and min_images_per_class must be at least 1")


class DatasetRejected(Exception):
    """An upload that cannot become a dataset.

    Attributes:
        message: what is wrong, naming the offending member(s).
        status: the HTTP status the caller should answer with: 400 when the upload is not
            a readable archive, 413 when it breaks a size or bomb cap, 422 when the archive
            is readable but its content is not an acceptable dataset.
        problems: one ``{"file": ..., "reason": ...}`` per offending member or class.
    """

    def __init__(self, message: str, *, status: int = 422, problems: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.problems: list[dict[str, str]] = list(problems or [])


@dataclass
class IngestResult:
    """What a successful ingest stored.

    Attributes:
        classes: class names (NFC-normalized folder names), sorted.
        counts: images per class.
        num_images: images in total.
        skipped: ``{"file": ..., "reason": ...}`` for every file left out (OS junk, files
            outside any class folder, and bad images when ``on_bad_file="skip"``).
    """

    classes: list[str]
    counts: dict[str, int]
    num_images: int
    skipped: list[dict[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- format detection


def detect_format(path: Path, filename: str) -> ArchiveFormat:
    """Tell which supported archive format a file holds, from its content.

    The file name is used only in messages: a ``.zip`` that really is a tar.gz is read as
    a tar.gz, and a PNG renamed ``.zip`` is refused.

    Args:
        path: the uploaded file.
        filename: the name the client gave it, for messages.

    Returns:
        ``"zip"``, ``"tar"`` or ``"tar.gz"``.

    Raises:
        DatasetRejected: status 400 when the file is empty, corrupt, or not one of the
            supported archive formats (the message says what it looks like instead).
    """
    with path.open("rb") as fh:
        head = fh.read(512)
    if not head:
        raise DatasetRejected(f"{filename!r} is empty, not an archive", status=400)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as gz:
                block = gz.read(512)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetRejected(f"{filename!r} is a corrupt gzip archive ({exc})", status=400) from None
        if _is_tar_header(block):
            return "tar.gz"
        raise DatasetRejected(
            f"{filename!r} is gzip-compressed but does not contain a tar archive; "
            "upload a .zip, .tar or .tar.gz of <class>/<image> folders",
            status=400,
        )
    if _is_tar_header(head):
        return "tar"
    looks_like = next((what for magic, what in _NOT_ARCHIVES if head.startswith(magic)), None)
    if looks_like is None and not head.strip(b"\x00"):
        looks_like = "only zero bytes (or an empty tar archive)"
    hint = f" (it looks like {looks_like})" if looks_like else ""
    raise DatasetRejected(
        f"{filename!r} is not a supported archive{hint}; upload a .zip, .tar or .tar.gz of <class>/<image> folders",
        status=400,
    )


def _is_tar_header(block: bytes) -> bool:
    """A 512-byte tar header with a valid checksum (v7, ustar, GNU and pax all have one)."""
    if len(block) < 512:
        return False
    field_ = block[148:156].split(b"\x00", 1)[0].strip()
    if not field_ or not all(48 <= b <= 55 for b in field_):
        return False
    stored = int(field_, 8)
    rest = block[:148] + b" " * 8 + block[156:512]
    unsigned = sum(rest)
    signed = sum(b - 256 if b > 127 else b for b in rest)
    return stored in (unsigned, signed)


# --------------------------------------------------------------------------- ingest


def ingest_archive(
    src: Path,
    filename: str,
    dest: Path,
    limits: IngestLimits = IngestLimits(),
    *,
    on_bad_file: Literal["reject", "skip"] = "reject",
) -> IngestResult:
    """Extract and validate an uploaded dataset archive into ``dest/<class>/<file>``.

    The archive (zip, tar or tar.gz, detected by content) must hold ``<class>/<image>``
    folders, optionally inside one wrapping folder, which is stripped. Work happens in a
    temporary folder next to ``dest``; only a fully valid dataset is renamed to ``dest``.
    On any failure, expected or not, neither the temporary folder nor ``dest`` remains.

    Args:
        src: the uploaded archive on disk.
        filename: the client's name for it, used in messages only.
        dest: where the dataset goes; must not exist yet (its parent is created if needed).
        limits: size, bomb and content caps.
        on_bad_file: what to do with a file in a class folder that is not a decodable
            image of a supported type: ``"reject"`` refuses the upload listing every such
            file, ``"skip"`` leaves them out and lists them in ``IngestResult.skipped``.

    Returns:
        The classes, per-class counts and skipped files of the stored dataset.

    Raises:
        DatasetRejected: the upload cannot become a dataset (see the module docstring for
            the status codes); ``problems`` names every offending member.
        FileExistsError: ``dest`` already exists (a caller bug, not the upload's fault).
        ValueError: ``on_bad_file`` is neither ``"reject"`` nor ``"skip"``.
    """
    if on_bad_file not in ("reject", "skip"):
        raise ValueError(f"on_bad_file must be 'reject' or 'skip', got {on_bad_file!r}")
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"dataset folder {dest} already exists")
    fmt = detect_format(src, filename)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as dest, so the final rename is atomic and never crosses file systems.
    work = dest.parent / f".{dest.name}.ingest-{secrets.token_hex(6)}"
    work.mkdir()
    try:
        incoming = work / _INCOMING
        incoming.mkdir()
        budget = _Budget(limits, archive_bytes=src.stat().st_size)
        found = _extract(src, fmt, filename, incoming, limits, budget)
        result = _build_dataset(found, work, limits, on_bad_file)
        shutil.rmtree(incoming)
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(f"dataset folder {dest} already exists")
        os.rename(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result


# --------------------------------------------------------------------------- caps


class _Budget:
    """Counts members and bytes as they are produced and stops at the first cap broken."""

    def __init__(self, limits: IngestLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = max(archive_bytes, 1)
        self.members = 0
        self.file_bytes = 0  # bytes written, plus the sizes of members read past unwritten
        self.stream_bytes = 0  # tar only: the whole decompressed tar stream
        self.current = ""  # member being read, for messages

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise DatasetRejected(
                f"the archive has more than {self.limits.max_members} entries (files and folders)",
                status=413,
            )

    def check_member_size(self, name: str, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise DatasetRejected(
                f"member {name!r} is larger than the {format_bytes(self.limits.max_file_bytes)} limit per file",
                status=413,
                problems=[{"file": name, "reason": f"larger than {format_bytes(self.limits.max_file_bytes)}"}],
            )

    def add_file_bytes(self, n: int) -> None:
        self.file_bytes += n
        if self.file_bytes > self.limits.max_total_bytes:
            raise DatasetRejected(
                f"the archive expands to more than {format_bytes(self.limits.max_total_bytes)} "
                f"(limit on total uncompressed size, reached at {self.current!r})",
                status=413,
            )
        self._check_ratio(self.file_bytes)

    def at_stream_offset(self, offset: int) -> None:
        self.stream_bytes = offset
        cap = self.limits.max_total_bytes + _TAR_OVERHEAD_PER_MEMBER * self.limits.max_members
        if offset > cap:
            raise DatasetRejected(
                f"the archive expands to more than {format_bytes(cap)} of tar data "
                f"(limit on total uncompressed size, reached after {self.current!r})",
                status=413,
            )
        self._check_ratio(offset)

    def _check_ratio(self, expanded: int) -> None:
        if expanded > self.limits.max_ratio * self.archive_bytes:
            raise DatasetRejected(
                f"the archive expands more than {self.limits.max_ratio:g}x its compressed size of "
                f"{format_bytes(self.archive_bytes)} (possible zip bomb; limit reached at {self.current!r})",
                status=413,
            )


class _ForwardReader(io.RawIOBase):
    """A forward-only view of the (decompressed) tar stream that reports every byte.

    tarfile skips member data by seeking; on a gzip stream that silently decompresses, so
    seeking is done here by reading, and each byte passes through the budget. It also
    refuses the one-shot giant reads tarfile makes for oversized pax/long-name headers.
    """

    def __init__(self, inner: IO[bytes], on_advance: Callable[[int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._on_advance = on_advance
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_TAR_HEADER_READ:
            raise tarfile.ReadError(f"oversized tar header or read request ({size} bytes)")
        data = self._inner.read(size)
        self._pos += len(data)
        self._on_advance(self._pos)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._pos + offset if whence == io.SEEK_CUR else -1
        if target < self._pos:
            raise tarfile.ReadError("tar stream cannot seek backwards")
        while self._pos < target:
            if not self.read(min(_CHUNK, target - self._pos)):
                break
        return self._pos


# --------------------------------------------------------------------------- reading members


@dataclass
class _Entry:
    name: str  # as stored in the archive
    is_dir: bool
    size: int  # declared; only trusted as an upper bound
    open: Callable[[], IO[bytes] | None] | None = None


def _refuse_member(name: str, reason: str, status: int = 422) -> DatasetRejected:
    return DatasetRejected(
        f"refusing the archive: member {name!r} {reason}",
        status=status,
        problems=[{"file": name, "reason": reason}],
    )


def _zip_entries(src: Path, budget: _Budget) -> Generator[_Entry, None, None]:
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        if len(infos) > budget.limits.max_members:
            raise DatasetRejected(
                f"the archive has {len(infos)} entries (files and folders); the limit is {budget.limits.max_members}",
                status=413,
            )
        for info in infos:
            name = _zip_name(info)
            mode = info.external_attr >> 16
            special = _ZIP_SPECIAL_TYPES.get(stat.S_IFMT(mode))
            if special:
                raise _refuse_member(name, f"is {special}; links and special files are not allowed")
            if info.flag_bits & 0x1:
                raise _refuse_member(name, "is encrypted; upload an archive without a password", 400)
            if info.is_dir() or stat.S_ISDIR(mode):
                yield _Entry(name, True, 0)
            else:
                yield _Entry(name, False, info.file_size, functools.partial(zf.open, info))


def _zip_name(info: zipfile.ZipInfo) -> str:
    # orig_filename keeps what zipfile cuts at a NUL byte. Names without the UTF-8 flag
    # are decoded as cp437, but many tools write UTF-8 without setting it.
    name = info.orig_filename
    if not info.flag_bits & 0x800:
        with contextlib.suppress(UnicodeError):
            name = name.encode("cp437").decode("utf-8")
    return name


def _tar_entries(src: Path, fmt: ArchiveFormat, budget: _Budget) -> Generator[_Entry, None, None]:
    with contextlib.ExitStack() as stack:
        raw: IO[bytes] = stack.enter_context(src.open("rb"))
        if fmt == "tar.gz":
            raw = cast(IO[bytes], stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        stream = _ForwardReader(raw, budget.at_stream_offset)
        tf = stack.enter_context(
            tarfile.open(fileobj=cast(IO[bytes], stream), mode="r:", encoding="utf-8", errors="surrogateescape")
        )
        for ti in tf:
            name = ti.name
            if ti.issym():
                raise _refuse_member(name, f"is a symbolic link (to {ti.linkname!r}); links are not allowed")
            if ti.islnk():
                raise _refuse_member(name, f"is a hard link (to {ti.linkname!r}); links are not allowed")
            if ti.ischr() or ti.isblk():
                raise _refuse_member(name, "is a device file; special files are not allowed")
            if ti.isfifo():
                raise _refuse_member(name, "is a FIFO; special files are not allowed")
            if ti.issparse():
                raise _refuse_member(name, "is a sparse file, which is not supported")
            if ti.isdir():
                yield _Entry(name, True, 0)
            elif ti.isreg():
                yield _Entry(name, False, ti.size, functools.partial(tf.extractfile, ti))
            else:
                raise _refuse_member(name, f"has an unsupported tar entry type {ti.type!r}")


def _member_parts(name: str) -> tuple[str, ...]:
    """Validate an archive member name and split it into NFC-normalized components.

    ``.`` and empty components (``./cat/1.jpg``, trailing slashes) are dropped; anything
    that could escape the extraction folder or fool a reader is refused, not rewritten.
    """
    nfc = unicodedata.normalize("NFC", name)
    if "\x00" in nfc:
        raise _refuse_member(name, "contains a NUL byte")
    if "\\" in nfc:
        raise _refuse_member(name, "contains a backslash (Windows separators and escapes are refused)")
    if nfc.startswith("/"):
        raise _refuse_member(name, "is an absolute path")
    if _DRIVE_LETTER.match(nfc):
        raise _refuse_member(name, "is an absolute Windows path (drive letter)")
    parts = tuple(p for p in nfc.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse_member(name, "contains a '..' component (path traversal)")
    for part in parts:
        if any("\ud800" <= c <= "\udfff" for c in part):
            raise _refuse_member(name, "has a name that is not valid UTF-8")
        if any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in part):
            raise _refuse_member(name, "contains control characters in its name")
        if len(part.encode("utf-8")) > _MAX_NAME_BYTES:
            raise _refuse_member(name, f"has a name component longer than {_MAX_NAME_BYTES} bytes")
    return parts


def _junk_reason(parts: tuple[str, ...]) -> str | None:
    for part in parts[:-1]:
        if part.casefold() in _JUNK_DIRS:
            return "macOS metadata (__MACOSX)"
        if part.startswith("."):
            return f"inside hidden folder {part!r}"
    last = parts[-1]
    if last.casefold() in _JUNK_DIRS:
        return "macOS metadata (__MACOSX)"
    if last.startswith("."):
        return "hidden file"
    if last.casefold() in _JUNK_FILES:
        return f"OS junk file ({last})"
    return None


@dataclass
class _File:
    parts: tuple[str, ...]
    staged: Path | None  # None when it was too deep to be worth extracting

    @property
    def display(self) -> str:
        return "/".join(self.parts)


@dataclass
class _Found:
    files: list[_File] = field(default_factory=list)
    dirs: set[tuple[str, ...]] = field(default_factory=set)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _extract(
    src: Path, fmt: ArchiveFormat, filename: str, incoming: Path, limits: IngestLimits, budget: _Budget
) -> _Found:
    """Read every member once, in archive order, staging regular files under counter names."""
    found = _Found()
    seen: dict[tuple[str, ...], bool] = {}  # parts -> is_dir
    entries = _zip_entries(src, budget) if fmt == "zip" else _tar_entries(src, fmt, budget)
    try:
        with contextlib.closing(entries):
            for index, entry in enumerate(entries):
                budget.current = entry.name
                budget.add_member()
                parts = _member_parts(entry.name)
                if not parts:
                    if entry.is_dir:
                        continue  # the archive's own root, e.g. "./"
                    raise _refuse_member(entry.name, "has an empty file name")
                display = "/".join(parts)
                if not entry.is_dir:
                    budget.check_member_size(display, entry.size)
                junk = _junk_reason(parts)
                if junk:
                    if not entry.is_dir:
                        found.skipped.append({"file": display, "reason": junk})
                        budget.add_file_bytes(entry.size)
                    continue
                if parts in seen and not (entry.is_dir and seen[parts]):
                    raise _refuse_member(display, "appears more than once in the archive")
                seen[parts] = entry.is_dir
                if entry.is_dir:
                    found.dirs.add(parts)
                elif len(parts) == 1:
                    found.skipped.append({"file": display, "reason": "not inside a class folder"})
                    budget.add_file_bytes(entry.size)
                elif len(parts) > 3:  # too deep even below a wrapping folder: don't bother reading
                    found.files.append(_File(parts, None))
                    budget.add_file_bytes(entry.size)
                else:
                    staged = incoming / str(index)
                    _copy_member(entry, display, staged, limits, budget)
                    found.files.append(_File(parts, staged))
    except _CORRUPT_ARCHIVE_ERRORS as exc:
        where = f" at member {budget.current!r}" if budget.current else ""
        raise DatasetRejected(
            f"{filename!r} is a corrupt or unreadable {fmt} archive{where}: {exc}", status=400
        ) from None
    return found


def _copy_member(entry: _Entry, display: str, staged: Path, limits: IngestLimits, budget: _Budget) -> None:
    """Copy one member, trusting neither its declared size nor the per-file cap to hold."""
    assert entry.open is not None
    allowed = min(entry.size, limits.max_file_bytes)
    written = 0
    source = _read_side(entry.open, display)
    if source is None:  # tarfile's answer for members without data; regular files always have some
        raise _refuse_member(display, "has no readable data", 400)
    with source as data, staged.open("xb") as out:
        while chunk := _read_side(functools.partial(data.read, _CHUNK), display):
            written += len(chunk)
            if written > allowed:
                if written > limits.max_file_bytes:
                    budget.check_member_size(display, written)
                raise DatasetRejected(
                    f"member {display!r} holds more data than its header declares ({entry.size} bytes)",
                    status=400,
                    problems=[{"file": display, "reason": "more data than declared"}],
                )
            budget.add_file_bytes(len(chunk))
            out.write(chunk)


def _read_side(call: Callable[[], _T], display: str) -> _T:
    """Run a read from the archive; an OSError there is damage, not a server fault.

    A zip member whose local header offset lies before the start of the file (found by
    fuzzing) makes zipfile seek to a negative position: ``OSError: [Errno 22]``. Writes to
    our own disk stay outside this wrapper, so a full disk is still a server error.
    """
    try:
        return call()
    except OSError as exc:
        raise DatasetRejected(
            f"refusing the archive: member {display!r} cannot be read, the archive is corrupt ({exc})",
            status=400,
            problems=[{"file": display, "reason": "unreadable (corrupt archive)"}],
        ) from None


# --------------------------------------------------------------------------- layout and checks


def _wrapping_folder(found: _Found) -> str | None:
    """The single top-level folder to strip, if the classes live one level down."""
    paths = [f.parts for f in found.files] + list(found.dirs)
    tops = {p[0] for p in paths}
    if len(tops) != 1:
        return None
    nested = any(len(f.parts) >= 3 for f in found.files) or any(len(d) >= 2 for d in found.dirs)
    return next(iter(tops)) if nested else None


def _build_dataset(
    found: _Found, work: Path, limits: IngestLimits, on_bad_file: Literal["reject", "skip"]
) -> IngestResult:
    skipped = list(found.skipped)
    strip = 1 if _wrapping_folder(found) else 0

    classes: dict[str, list[tuple[str, _File]]] = {}
    too_deep: list[str] = []
    for d in sorted(found.dirs):
        rel = d[strip:]
        if len(rel) == 1:
            classes.setdefault(rel[0], [])
        elif len(rel) > 1:
            too_deep.append("/".join(d) + "/")
    for f in found.files:
        rel = f.parts[strip:]
        if len(rel) == 1:
            skipped.append({"file": f.display, "reason": "not inside a class folder"})
        elif len(rel) == 2:
            classes.setdefault(rel[0], []).append((rel[1], f))
        else:
            too_deep.append(f.display)
    if too_deep:
        shape = "<folder>/<class>/<image>" if strip else "<class>/<image>"
        raise DatasetRejected(
            f"folders are nested too deeply: expected {shape} (optionally inside one wrapping folder), "
            f"found {_listing(too_deep)}",
            problems=[{"file": p, "reason": f"nested deeper than {shape}"} for p in too_deep],
        )

    long_names = [c for c in classes if len(c) > _MAX_CLASS_NAME_CHARS]
    if long_names:
        raise DatasetRejected(
            f"class folder names must be at most {_MAX_CLASS_NAME_CHARS} characters: {_listing(long_names)}",
            problems=[{"file": c + "/", "reason": "class name too long"} for c in long_names],
        )

    bad: list[dict[str, str]] = []
    good: dict[str, list[tuple[str, _File]]] = {name: [] for name in classes}
    for name, members in classes.items():
        for file_name, f in members:
            assert f.staged is not None
            reason = _image_problem(f.staged, limits.max_image_pixels)
            if reason is None:
                good[name].append((file_name, f))
            else:
                bad.append({"file": f.display, "reason": reason})
    if bad and on_bad_file == "reject":
        details = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DatasetRejected(
            f"{len(bad)} file(s) in class folders are not usable images (supported: {_SUPPORTED_IMAGES}): "
            f"{details}{more}. Remove them, or choose to skip bad files",
            problems=bad,
        )
    skipped.extend(bad)

    if len(good) < limits.min_classes:
        found_names = f": {', '.join(sorted(good))}" if good else " (expected <class>/<image> folders)"
        raise DatasetRejected(
            f"need at least {limits.min_classes} classes, found {len(good)}{found_names}",
            problems=[{"file": c + "/", "reason": "the only class"} for c in sorted(good)],
        )
    small = {c: len(v) for c, v in sorted(good.items()) if len(v) < limits.min_images_per_class}
    if small:
        listing = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise DatasetRejected(
            f"every class needs at least {limits.min_images_per_class} images; too few in: {listing}",
            problems=[{"file": c + "/", "reason": f"{n} usable image(s)"} for c, n in small.items()],
        )

    root = work.resolve()
    for name, members in good.items():
        class_dir = work / name
        class_dir.mkdir()
        for file_name, f in members:
            target = class_dir / file_name
            # Names were validated component by component; this is the belt to those braces.
            if target.resolve().parent != class_dir.resolve() or not target.resolve().is_relative_to(root):
                raise _refuse_member(f.display, "resolves outside the dataset folder")
            if target.exists():
                raise _refuse_member(f.display, "appears more than once in the archive")
            assert f.staged is not None
            os.rename(f.staged, target)

    counts = {name: len(good[name]) for name in sorted(good)}
    return IngestResult(classes=sorted(good), counts=counts, num_images=sum(counts.values()), skipped=skipped)


def _listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _image_problem(path: Path, max_pixels: int) -> str | None:
    """Why a staged file is not a usable image, or None when it is.

    The pixel count is checked from the header before any decoding. ``verify`` catches
    bad checksums but not truncation, so the image is then reopened and fully loaded.
    """
    try:
        with path.open("rb") as fh, warnings.catch_warnings():
            # PIL warns (rather than raises) between MAX_IMAGE_PIXELS and twice that.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh, formats=_PIL_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    return (
                        f"image too large: {width}x{height} = {width * height} pixels "
                        f"(limit {max_pixels}; possible decompression bomb)"
                    )
                im.verify()
            fh.seek(0)
            with Image.open(fh, formats=_PIL_FORMATS) as im:
                im.load()
    except UnidentifiedImageError:
        return "not an image (cannot identify image file)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"image too large ({exc})"
    except Exception as exc:  # PIL reports malformed data with many exception types
        detail = str(exc).replace(str(path), "<file>") or type(exc).__name__
        return f"corrupt image ({detail})"
    return None
