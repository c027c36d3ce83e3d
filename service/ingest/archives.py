"""Reading an uploaded archive: format detection by content, and the zip and tar member readers.

The readers yield one :class:`_Entry` per member, refusing links, devices and other
special entries on sight; a member's data is only opened on demand. The tar reader sees
the (decompressed) stream through :class:`_ForwardReader`, so every byte passes the budget.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, cast

from models.units import format_bytes
from service.ingest.errors import DatasetRejected, _refuse_member
from service.ingest.limits import IngestLimits, _Budget

ArchiveFormat = Literal["zip", "tar", "tar.gz"]

_CHUNK = 1024 * 1024
# tarfile reads a pax or GNU long-name header in one ``read`` of its declared size; a
# bigger single read than this can only be such a header, and a hostile one.
_MAX_TAR_HEADER_READ = 8 * 1024 * 1024

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


def _zip_entries(src: Path, budget: _Budget) -> Generator[_Entry, None, None]:
    _check_zip_directory(src, budget.limits)
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        if len(infos) > budget.limits.max_members:
            raise _too_many_entries(len(infos), budget.limits)
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


# --------------------------------------------------------------------------- the zip's directory, before ZipFile

# zipfile.ZipFile parses the whole central directory into ZipInfo objects (about 470 bytes of
# memory each, plus names) before anything can be checked, and it parses every entry found in
# the directory's declared size whatever count the end record gives. So the end records are
# read first, and the directory's fixed-size entry headers are counted without keeping them.
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end of central directory record
_LOCATOR64 = struct.Struct("<4sLQL")  # ZIP64 end of central directory locator
_CENTRAL_HEADER_SIZE = 46  # fixed part of a central directory entry; name, extra and comment follow
_MAX_COMMENT = 0xFFFF
# Directory bytes an entry of an acceptable dataset may need on average: the longest name the
# layout allows (three 255-byte components), the fixed header and the usual extra fields.
_DIRECTORY_BYTES_PER_MEMBER = 1024


def _too_many_entries(count: int, limits: IngestLimits) -> DatasetRejected:
    return DatasetRejected(
        f"the archive has {count} entries (files and folders); the limit is {limits.max_members}", status=413
    )


def _check_zip_directory(src: Path, limits: IngestLimits) -> None:
    """Refuse a zip whose central directory breaks the caps, before ``zipfile.ZipFile`` parses it.

    Checks the entry count the end record declares (ZIP64 included), the directory's declared
    size, and the number of entries actually in it (an end record may understate it). An archive
    without a readable end record is left to ``ZipFile``, which calls it corrupt.

    Raises:
        DatasetRejected: status 413, naming the count or size and the cap.
    """
    with src.open("rb") as fh:
        found = _zip_directory(fh)
        if found is None:
            return
        declared, size, start = found
        if declared > limits.max_members:
            raise _too_many_entries(declared, limits)
        cap = limits.max_members * _DIRECTORY_BYTES_PER_MEMBER
        if size > cap:
            raise DatasetRejected(
                f"the archive's central directory is {format_bytes(size)}; the limit is {format_bytes(cap)} "
                f"({limits.max_members} entries at most, {_DIRECTORY_BYTES_PER_MEMBER} bytes each)",
                status=413,
            )
        if _count_directory_entries(fh, start, size, stop_after=limits.max_members) > limits.max_members:
            raise DatasetRejected(
                f"the archive has more than {limits.max_members} entries (files and folders) in its central "
                f"directory, though its end record declares {declared}; the limit is {limits.max_members}",
                status=413,
            )


def _zip_directory(fh: IO[bytes]) -> tuple[int, int, int] | None:
    """(declared entries, directory size, directory start) as ``zipfile.ZipFile`` will take them.

    Mirrors zipfile's search: the end record right at the end of the file, else the last one in
    the final 64 KiB (a comment may follow it); a ZIP64 locator just before it means the ZIP64
    record just before that holds the real figures. The directory ends where those records begin.
    """
    file_size = fh.seek(0, io.SEEK_END)
    tail_start = max(file_size - _EOCD.size - _MAX_COMMENT, 0)
    fh.seek(tail_start)
    tail = fh.read()
    at = len(tail) - _EOCD.size
    if not (at >= 0 and tail.startswith(b"PK\x05\x06", at) and tail.endswith(b"\x00\x00")):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    _sig, _disk, _cd_disk, on_disk, total, size, _offset, _comment = _EOCD.unpack_from(tail, at)
    location = tail_start + at
    declared, end = max(on_disk, total), location
    record_at = location - _LOCATOR64.size - _EOCD64.size
    if record_at >= 0:
        fh.seek(record_at)
        zip64 = fh.read(_EOCD64.size + _LOCATOR64.size)
        if zip64.startswith(b"PK\x06\x06") and zip64.startswith(b"PK\x06\x07", _EOCD64.size):
            fields = _EOCD64.unpack_from(zip64)
            declared, size, end = max(fields[6], fields[7]), fields[8], record_at
    return declared, size, end - size


def _count_directory_entries(fh: IO[bytes], start: int, size: int, stop_after: int) -> int:
    """Entries in the ``size`` directory bytes at ``start`` (counting stops past ``stop_after``).

    Reads one fixed-size header at a time and keeps nothing; a malformed entry ends the count,
    and ``ZipFile`` will call the archive corrupt there.
    """
    if start < 0:
        return 0
    count = pos = 0
    while pos < size and count <= stop_after:
        fh.seek(start + pos)
        header = fh.read(_CENTRAL_HEADER_SIZE)
        if len(header) < _CENTRAL_HEADER_SIZE or not header.startswith(b"PK\x01\x02"):
            break
        name_len, extra_len, comment_len = struct.unpack_from("<3H", header, 28)
        count += 1
        pos += _CENTRAL_HEADER_SIZE + name_len + extra_len + comment_len
    return count


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
