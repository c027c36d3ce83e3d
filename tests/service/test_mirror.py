"""Local copies of stored trees (``service.storage.mirror``): fetched once, whole or not at all, bounded."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from service.storage import KeyMissing
from service.storage.local import LocalStore
from service.storage.mirror import COMPLETE, Mirror


class RemoteLocalStore(LocalStore):
    """A local folder that says it is remote (no ``local_path``), so the mirror copies from it; counts reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[str] = []
        self.fail_on: str | None = None

    def local_path(self, key: str) -> None:  # type: ignore[override]
        return None

    def get_file(self, key: str, dest: Path) -> None:
        self.gets.append(key)
        if self.fail_on is not None and key.endswith(self.fail_on):
            raise OSError("connection reset")
        time.sleep(0.01)  # a network round trip, so concurrent callers overlap
        super().get_file(key, dest)


def _tree(store: LocalStore, prefix: str, files: dict[str, int]) -> None:
    for name, size in files.items():
        store.put_bytes(f"{prefix}/{name}", os.urandom(size))


@pytest.fixture
def store(tmp_path) -> RemoteLocalStore:
    return RemoteLocalStore(tmp_path / "bucket")


def test_a_tree_is_copied_once_and_reused(store, tmp_path) -> None:
    _tree(store, "models/m1", {"model.safetensors": 1000, "manifest.json": 10, "exports/e.zip": 500})
    mirror = Mirror(store, tmp_path / "scratch", max_bytes=10**9)
    local = mirror.tree("models/m1", skip=("exports",))
    assert local == tmp_path / "scratch" / "mirror" / "models" / "m1"
    assert sorted(p.name for p in local.iterdir()) == sorted(["model.safetensors", "manifest.json", COMPLETE])
    assert (local / "model.safetensors").read_bytes() == store.get_bytes("models/m1/model.safetensors")
    assert len(store.gets) == 2  # the export was skipped
    assert mirror.tree("models/m1", skip=("exports",)) == local
    assert len(store.gets) == 2  # reused, not fetched again
    # another mirror on the same scratch dir (another process of the host) reuses it too
    assert Mirror(store, tmp_path / "scratch", max_bytes=10**9).tree("models/m1") == local
    assert len(store.gets) == 2


def test_a_missing_tree_is_key_missing_and_a_failed_copy_leaves_nothing(store, tmp_path) -> None:
    mirror = Mirror(store, tmp_path / "scratch", max_bytes=10**9)
    with pytest.raises(KeyMissing):
        mirror.tree("datasets/none")
    _tree(store, "datasets/d1", {f"a/{i}.png": 10 for i in range(5)})
    store.fail_on = "3.png"
    with pytest.raises(OSError, match="connection reset"):
        mirror.tree("datasets/d1")
    parent = tmp_path / "scratch" / "mirror" / "datasets"
    assert [p.name for p in parent.iterdir()] == []  # no half copy, no temporary folder
    store.fail_on = None
    local = mirror.tree("datasets/d1")
    assert sorted(p.name for p in (local / "a").iterdir()) == [f"{i}.png" for i in range(5)]


def test_concurrent_first_uses_fetch_once(store, tmp_path) -> None:
    _tree(store, "datasets/d1", {f"c/{i}.png": 100 for i in range(10)})
    mirror = Mirror(store, tmp_path / "scratch", max_bytes=10**9, threads=2)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(mirror.tree("datasets/d1"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(store.gets) == 10  # one copy, not four


def test_copies_are_bounded_least_recently_used_first(store, tmp_path) -> None:
    for name in ("a", "b", "c"):
        _tree(store, f"models/{name}", {"w": 1000})
    mirror = Mirror(store, tmp_path / "scratch", max_bytes=2500, in_use_s=0)
    a = mirror.tree("models/a")
    time.sleep(0.02)
    b = mirror.tree("models/b")
    time.sleep(0.02)
    mirror.tree("models/a")  # used again: b is now the least recently used
    time.sleep(0.02)
    c = mirror.tree("models/c")  # 3000 bytes > 2500: one goes
    assert a.exists() and c.exists() and not b.exists()
    # a copy in use (used within in_use_s) is never removed, even over the bound
    busy = Mirror(store, tmp_path / "scratch", max_bytes=0, in_use_s=3600)
    busy.tree("models/b")
    assert a.exists() and c.exists()


def test_drop_removes_this_hosts_copy(store, tmp_path) -> None:
    _tree(store, "models/m", {"w": 10})
    mirror = Mirror(store, tmp_path / "scratch", max_bytes=10**9)
    local = mirror.tree("models/m")
    mirror.drop("models/m")
    assert not local.exists()
    store.delete_tree("models/m")
    with pytest.raises(KeyMissing):
        mirror.tree("models/m")


def test_a_local_store_is_read_in_place(tmp_path) -> None:
    store = LocalStore(tmp_path / "data")
    _tree(store, "datasets/d", {"a/1.png": 10})
    mirror = Mirror(store, tmp_path / "scratch", max_bytes=0)
    assert mirror.tree("datasets/d") == tmp_path / "data" / "datasets" / "d"
    assert not (tmp_path / "scratch" / "mirror").exists()
