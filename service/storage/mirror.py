"""Local folders for stored trees: a dataset to decode, a model to load, on this host.

A ``LocalStore``'s trees are read in place. With an object store each tree is copied once into
``<scratch>/mirror/<key>`` (every object listed, downloaded by ``transfer_threads`` at once into a
temporary folder that is renamed into place once complete, so a half copy is never used) and
reused after. Stored trees never change once their record is committed (a model or dataset is
written once under a new id), so a complete copy stays right until the record is deleted.

The copies are bounded: ``scratch_max_bytes`` in all, the least recently used removed first.
A copy used in the last ``in_use_s`` seconds is not removed (a worker may be reading it), so the
bound can be exceeded for that long. Processes on one host share the copies; an ``flock`` per
key keeps two of them from downloading the same tree at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.config import Settings
from service.storage import store_for
from service.storage.base import KeyMissing, Store, check_key

log = logging.getLogger("zoofit.storage")

COMPLETE = ".zoofit-complete"  # written last into a copy (its size in bytes then); its mtime is the last use


class Mirror:
    def __init__(self, store: Store, scratch: Path, max_bytes: int, *, threads: int = 16,
                 in_use_s: float = 600.0) -> None:
        self.store = store
        self.root = Path(scratch) / "mirror"
        self.max_bytes = max_bytes
        self.threads = threads
        self.in_use_s = in_use_s
        self._lock = threading.Lock()

    def tree(self, prefix: str, *, skip: tuple[str, ...] = ()) -> Path:
        """A local folder holding every object under ``prefix`` (but those under ``prefix/<skip dir>/``).

        Raises:
            KeyMissing: nothing is stored under ``prefix``.
            StoreUnavailable: the store could not be read.
        """
        prefix = check_key(prefix)
        local = self.store.local_path(prefix)
        if local is not None:
            if not local.is_dir():
                raise KeyMissing(prefix)
            return local
        dest = self.root / prefix
        if self._touch(dest):
            return dest
        with self._key_lock(prefix):
            if self._touch(dest):  # another process copied it meanwhile
                return dest
            size = self._fetch(prefix, dest, skip)
        log.info("copied %s from %s into %s (%d bytes)", prefix, self.store.url, dest, size)
        self.evict(keep=dest)
        return dest

    def drop(self, prefix: str) -> None:
        """Remove this host's copy of the tree (its record was deleted)."""
        if self.store.local_path(check_key(prefix)) is not None:
            return
        dest = self.root / prefix
        with self._key_lock(prefix):
            _remove(dest)

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used copies until all fit in ``max_bytes``; bytes freed."""
        with self._lock:
            copies = sorted(self._copies(), key=lambda c: c[1])  # oldest use first
            total = sum(size for _, _, size in copies)
            freed = 0
            now = time.time()
            for path, used, size in copies:
                if total - freed <= self.max_bytes:
                    break
                if path == keep or now - used < self.in_use_s:
                    continue
                _remove(path)
                freed += size
                log.info("removed the local copy %s (%d bytes; scratch bound %d)", path, size, self.max_bytes)
            return freed

    def _copies(self) -> Iterator[tuple[Path, float, int]]:
        if not self.root.is_dir():
            return
        for marker in self.root.rglob(COMPLETE):
            try:
                # Measured, not the size recorded at copy time: an API process adds its ONNX graph.
                yield marker.parent, marker.stat().st_mtime, _disk_bytes(marker.parent)
            except OSError:
                continue

    def _touch(self, dest: Path) -> bool:
        marker = dest / COMPLETE
        try:
            os.utime(marker)  # its mtime is the copy's last use
        except FileNotFoundError:
            return False
        return True

    def _fetch(self, prefix: str, dest: Path, skip: tuple[str, ...]) -> int:
        skipped = tuple(f"{prefix}/{s.strip('/')}/" for s in skip)
        objects = [o for o in self.store.list(prefix) if not o.key.startswith(skipped)]
        if not objects:
            raise KeyMissing(prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
        try:
            cut = len(prefix) + 1

            def get(key: str) -> None:
                self.store.get_file(key, tmp / key[cut:])

            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                list(pool.map(get, [o.key for o in objects]))
            size = sum(o.size for o in objects)
            (tmp / COMPLETE).write_text(str(size))
            _remove(dest)  # an incomplete copy a killed process left
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return size

    @contextlib.contextmanager
    def _key_lock(self, prefix: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(prefix.encode()).hexdigest()[:32]
        with open(locks / name, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _disk_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _remove(path: Path) -> None:
    if not path.exists():
        return
    gone = path.with_name(f".gone-{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(path, gone)  # out of the way at once; removed after
    except OSError:
        gone = path
    shutil.rmtree(gone, ignore_errors=True)


_mirrors: dict[tuple[str, str, int], Mirror] = {}
_mirrors_lock = threading.Lock()


def mirror_for(settings: Settings) -> Mirror:
    """This process's mirror of the settings' store in its scratch dir."""
    store = store_for(settings)
    key = (store.url, str(settings.cache_dir.resolve()), settings.scratch_max_bytes)
    with _mirrors_lock:
        found = _mirrors.get(key)
        if found is None:
            found = _mirrors[key] = Mirror(store, settings.cache_dir, settings.scratch_max_bytes,
                                           threads=settings.s3_transfer_threads)
        return found
