"""What deleting leaves behind: every byte derived from a dataset goes with it; caches are bounded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from models.data import load_folder, prune_cache
from tests.utils.data import TINY_JOB, animals_zip
from workers.jobs import run_job


def _files(root: Path) -> set[str]:
    # The database (SQLite in the data dir) changes with every request; everything else is compared.
    return {
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("zoofit.db")
    }


def test_deleting_a_dataset_removes_every_byte_derived_from_it(client, settings) -> None:
    before = _files(settings.data_dir)
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 1}).json()
    assert run_job(job["id"], settings=settings) == "succeeded"
    model_id = client.get(f"/v1/jobs/{job['id']}").json()["model_id"]
    during = _files(settings.data_dir)
    assert any(ds["id"] in f for f in during)
    cached = [f for f in during - before if f.startswith("cache/") and f.endswith(".npz")]
    assert cached, "training decoded the dataset into the cache"

    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    left = _files(settings.data_dir) - before
    # The model trained on it is a resource of its own (deleted through /v1/models); nothing else stays.
    assert {f for f in left if not f.startswith(f"models/{model_id}/")} == set(), left


def _npz(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.zeros(size, dtype=np.uint8))


def test_the_decoded_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for i, name in enumerate(["a", "b", "c", "d"]):
        _npz(cache / f"ds{name}-key.npz", 100_000)
        os.utime(cache / f"ds{name}-key.npz", (1_000_000 + i, 1_000_000 + i))
    os.utime(cache / "dsa-key.npz", (2_000_000, 2_000_000))  # a was used last
    removed = prune_cache(cache, max_bytes=250_000, keep=cache / "dsd-key.npz")
    assert sorted(p.name for p in cache.iterdir()) == ["dsa-key.npz", "dsd-key.npz"]
    assert sorted(p.name for p in removed) == ["dsb-key.npz", "dsc-key.npz"]


def test_a_cache_read_counts_as_a_use(tmp_path: Path) -> None:
    root, cache = tmp_path / "ds1", tmp_path / "cache"
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (40 * c, 60 * i, 90)).save(root / cls / f"{i}.png")
    load_folder(root, ["cat", "dog"], 16, "bilinear", cache, cache_tag="ds1")
    (entry,) = cache.glob("ds1-*.npz")
    os.utime(entry, (1, 1))
    load_folder(root, ["cat", "dog"], 16, "bilinear", cache, cache_tag="ds1")
    assert entry.stat().st_mtime > 1_000_000
