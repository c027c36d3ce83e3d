"""What every artifact store offers: objects under keys relative to its root.

A key is a relative POSIX path (``datasets/<id>/<class>/<file>``, ``models/<id>/manifest.json``,
``checkpoints/<job id>/state.safetensors``). Writing one object is atomic as readers see it: a
reader gets the old object, the new one, or none, never part of one. A *tree* is every object
under a prefix; it is published by writing its objects and then committing the database row that
names the prefix, so a crash mid-way leaves nothing any row points at.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

TMP_PREFIX = ".zoofit-tmp-"  # files being written; never listed as stored objects


@contextlib.contextmanager
def written_whole(dest: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write: renamed over ``dest`` when the block ends, removed if it
    raises, so ``dest`` is only ever the old file or the whole new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class KeyMissing(LookupError):
    """The store holds no object under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no stored object {key!r}")
        self.key = key


class StoreUnavailable(RuntimeError):
    """The store could not be reached or refused the request (credentials, bucket, network)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    version: str  # changes whenever the object is written again (mtime in ns, or the ETag)


def check_key(key: str) -> str:
    """``key`` if it is a clean relative POSIX path, else ValueError (no ``..``, no absolute, no empties)."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"bad store key {key!r}")
    parts = PurePosixPath(key).parts
    if any(p in ("", ".", "..") for p in parts) or "/".join(parts) != key.rstrip("/"):
        raise ValueError(f"bad store key {key!r}")
    return key.rstrip("/")


def join(*parts: str) -> str:
    """One key from its parts (``join("models", id, "manifest.json")``)."""
    return check_key("/".join(p.strip("/") for p in parts if p))


class Store(Protocol):
    """An artifact store: the local data dir (``LocalStore``) or an S3 bucket (``S3Store``)."""

    url: str  # what it is, for logs and errors (no credentials)

    def __hash__(self) -> int: ...  # clients are compared by identity (one per process: ``store_for``)

    def put_file(self, key: str, src: Path) -> None:
        """Store the file ``src`` under ``key``, replacing what was there; atomic for readers."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there; atomic for readers."""

    def get_file(self, key: str, dest: Path) -> None:
        """Copy the object to the local file ``dest`` (written whole, then renamed). Raises KeyMissing."""

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes. Raises KeyMissing."""

    def open_read(self, key: str) -> BinaryIO:
        """A readable stream of the object (the caller closes it). Raises KeyMissing."""

    def info(self, key: str) -> ObjectInfo:
        """Size and version of the object. Raises KeyMissing."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix/`` (recursively), in key order."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is no error."""

    def delete_tree(self, prefix: str) -> int:
        """Remove every object under ``prefix/``; how many went."""

    def put_tree(self, prefix: str, src: Path) -> int:
        """Store every regular file under the local folder ``src`` as ``prefix/<relative path>``.

        Moves what it can (``src`` is consumed: its files are gone or moved afterwards). Returns the
        number of files. On an error, what was written under ``prefix`` is removed again.
        """

    def local_path(self, key: str) -> Path | None:
        """The object's own file when the store is a local folder (read it in place), else None."""

    def check(self) -> None:
        """Raise StoreUnavailable unless the store can be written and read.

        One small object under ``_zoofit/`` is written, read back and removed: run at API and worker
        start, so that a wrong bucket or credentials fail at boot, not at the first upload.
        """
