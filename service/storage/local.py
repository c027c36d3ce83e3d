"""The embedded store: a folder on the local disk (the data dir), keys are paths under it.

Atomic writes are a temporary file beside the target renamed over it; ``put_tree`` renames the
source folder's files into place (one rename each when they are on the same file system).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.storage.base import TMP_PREFIX, KeyMissing, ObjectInfo, StoreUnavailable, check_key, written_whole

_TMP = TMP_PREFIX


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _regular(self, key: str) -> Path:
        """The key's file, if it is a regular file reached through no link (else KeyMissing)."""
        path = self._path(key)
        try:
            at = self.root
            for part in PurePosixPath(key).parts:
                at = at / part
                if at.is_symlink():
                    raise KeyMissing(key)
            if not path.is_file():
                raise KeyMissing(key)
        except OSError:
            raise KeyMissing(key) from None
        return path

    def put_file(self, key: str, src: Path) -> None:
        with written_whole(self._path(key), 0o644) as tmp:
            shutil.copyfile(src, tmp)

    def put_bytes(self, key: str, data: bytes) -> None:
        with written_whole(self._path(key), 0o644) as tmp:
            tmp.write_bytes(data)

    def get_file(self, key: str, dest: Path) -> None:
        src = self._regular(key)
        try:
            with written_whole(Path(dest)) as tmp:
                shutil.copyfile(src, tmp)
        except FileNotFoundError:
            raise KeyMissing(key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._regular(key).read_bytes()
        except FileNotFoundError:
            raise KeyMissing(key) from None

    def open_read(self, key: str) -> BinaryIO:
        try:
            return self._regular(key).open("rb")
        except FileNotFoundError:
            raise KeyMissing(key) from None

    def info(self, key: str) -> ObjectInfo:
        try:
            st = self._regular(key).stat()
        except FileNotFoundError:
            raise KeyMissing(key) from None
        return ObjectInfo(check_key(key), st.st_size, str(st.st_mtime_ns))

    def exists(self, key: str) -> bool:
        try:
            self._regular(key)
        except KeyMissing:
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        if base.is_symlink() or not base.is_dir():
            return
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                if name.startswith(_TMP):
                    continue
                path = Path(dirpath) / name
                try:
                    if path.is_symlink() or not path.is_file():
                        continue
                    st = path.stat()
                except OSError:
                    continue
                found.append(ObjectInfo(path.relative_to(self.root).as_posix(), st.st_size, str(st.st_mtime_ns)))
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_tree(self, prefix: str) -> int:
        base = self._path(prefix)
        if base.is_symlink() or not base.is_dir():
            return 0
        n = sum(1 for _ in self.list(prefix))
        # Renamed aside first: a reader never sees a half-removed tree under the prefix.
        gone = base.with_name(f"{_TMP}{base.name}.{os.getpid()}.deleted")
        try:
            os.replace(base, gone)
        except OSError:
            gone = base
        shutil.rmtree(gone, ignore_errors=True)
        return n

    def put_tree(self, prefix: str, src: Path) -> int:
        target = self._path(prefix)
        src = Path(src)
        n = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise FileExistsError(f"store tree {prefix!r} already exists")
        try:
            os.replace(src, target)  # one rename: the whole tree appears at once
        except OSError:
            # Another file system: copied beside the target, then renamed into place.
            tmp = Path(tempfile.mkdtemp(prefix=_TMP, dir=target.parent))
            try:
                shutil.copytree(src, tmp / "t", symlinks=True)
                os.replace(tmp / "t", target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
        target.chmod(0o755)
        return n

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def check(self) -> None:
        key = f"_zoofit/check-{uuid.uuid4().hex}"
        data = os.urandom(16)
        try:
            self.put_bytes(key, data)
            try:
                if self.get_bytes(key) != data:
                    raise StoreUnavailable(f"{self.url}: wrote {key!r} but read other bytes back")
            finally:
                self.delete(key)
        except (OSError, KeyMissing) as exc:
            raise StoreUnavailable(f"{self.url}: cannot write and read back {key!r} ({exc})") from exc
