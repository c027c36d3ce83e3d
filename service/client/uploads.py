"""Upload bodies that stream: an archive as it is on disk, or a folder zipped on the fly.

Neither is read into memory whole: the multipart body is a generator of chunks, and a folder
goes through :class:`zipfile.ZipFile` writing to a sink that hands each chunk on as soon as it
is written (the unseekable-stream mode, with a data descriptor after each file).
"""

from __future__ import annotations

import io
import os
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1024 * 1024
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class UploadBody:
    """A streaming multipart body: ``size`` is exact for an archive; for a folder, the files' bytes."""

    filename: str
    chunks: Iterator[bytes]
    size: int
    exact: bool
    content_type: str


def _chunks_of_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class _Sink(io.RawIOBase):
    """A write-only, unseekable stream that keeps what was written until :meth:`take`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
        self._parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def folder_files(folder: Path) -> list[Path]:
    """Regular files under ``folder``, in a stable order (hidden files and folders left out)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return [p for p in out if p.is_file()]


def zip_folder(folder: Path) -> Iterator[bytes]:
    """A zip of ``folder`` (named ``<folder>/<class>/<image>``), chunk by chunk.

    Stored, not deflated: images are compressed already, and deflating gigabytes would cost the
    CPU more than the bytes saved on the wire.
    """
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:
        for path in folder_files(folder):
            arcname = f"{folder.name}/{path.relative_to(folder).as_posix()}"
            size = path.stat().st_size
            with zf.open(arcname, "w", force_zip64=size >= 2**31) as dest:
                for chunk in _chunks_of_file(path):
                    dest.write(chunk)
                    if out := sink.take():
                        yield out
            if out := sink.take():
                yield out
    if out := sink.take():  # the central directory
        yield out


def upload_body(path: Path) -> UploadBody:
    """The archive at ``path`` as it is, or the folder at ``path`` zipped on the fly."""
    if path.is_dir():
        size = sum(p.stat().st_size for p in folder_files(path))
        return UploadBody(f"{path.name}.zip", zip_folder(path), size, False, "application/zip")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = "application/gzip" if path.name.endswith((".gz", ".tgz")) else (
        "application/x-tar" if path.name.endswith(".tar") else "application/zip")
    return UploadBody(path.name, _chunks_of_file(path), path.stat().st_size, True, kind)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


def multipart(body: UploadBody, fields: dict[str, str], on_bytes: Progress | None = None
              ) -> tuple[str, Iterator[bytes], int | None]:
    """(content type, chunks, content length or None) of a form with ``fields`` and the file as ``file``."""
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(k)}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ) + (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quote(body.filename)}"\r\n'
        f"Content-Type: {body.content_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for chunk in body.chunks:
            if on_bytes is not None:
                on_bytes(len(chunk))
            yield chunk
        yield tail

    length = len(head) + body.size + len(tail) if body.exact else None
    return f"multipart/form-data; boundary={boundary}", chunks(), length


def upload_size(path: str | Path) -> int:
    """The bytes :func:`upload_body` will send of ``path``'s content (for a progress bar's total)."""
    return upload_body(Path(path)).size
