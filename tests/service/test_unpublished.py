"""What a writer killed between its upload and its commit leaves in the store is swept (``service.unpublished``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service import unpublished
from service.db import DatasetRow, UnpublishedRow, session_scope
from service.storage import store_for
from tests.conftest import api_client
from tests.utils.data import animals_zip


def _tree(tmp: Path, files: int = 3) -> Path:
    for i in range(files):
        (tmp / "c").mkdir(parents=True, exist_ok=True)
        (tmp / "c" / f"{i}.png").write_bytes(os.urandom(10))
    return tmp


def _reserved(settings) -> list[str]:
    with session_scope(settings) as s:
        return list(s.scalars(select(UnpublishedRow.key)))


def test_a_writer_that_died_before_publishing_leaves_objects_the_sweep_removes(make_settings, tmp_path) -> None:
    settings = make_settings(unpublished_after_s="0.5")
    store = store_for(settings)
    # died: reserved and uploaded, never published
    unpublished.reserve(settings, "models/dead")
    store.put_tree("models/dead", _tree(tmp_path / "a"))
    # published: its row's transaction removed the record
    unpublished.reserve(settings, "models/live")
    store.put_tree("models/live", _tree(tmp_path / "b"))
    with session_scope(settings) as s:
        unpublished.publish(s, "models/live")
    assert unpublished.sweep(settings) == []  # too young yet
    time.sleep(0.6)
    unpublished.reserve(settings, "models/young")  # an upload in progress now
    store.put_tree("models/young", _tree(tmp_path / "c"))
    assert unpublished.sweep(settings) == ["models/dead"]
    assert [o.key for o in store.list("models/dead")] == []
    assert len(list(store.list("models/live"))) == 3 and len(list(store.list("models/young"))) == 3
    assert _reserved(settings) == ["models/young"]


def test_a_publish_after_the_sweep_took_its_record_fails_and_commits_nothing(make_settings, monkeypatch) -> None:
    settings = make_settings(unpublished_after_s="0.01")
    store = store_for(settings)
    put_tree = type(store).put_tree

    def stalled(self, prefix, src):  # uploads, then stalls past the limit while a sweep runs
        n = put_tree(self, prefix, src)
        time.sleep(0.05)
        assert unpublished.sweep(settings) == [prefix]
        return n

    monkeypatch.setattr(type(store), "put_tree", stalled)
    with api_client(settings) as client:
        r = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(2, 2), "application/zip")})
    assert r.status_code == 503, r.text
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(DatasetRow)) == 0  # no row names the removed objects
    assert [o.key for o in store.list("datasets")] == [] and _reserved(settings) == []


def test_uploads_that_end_normally_leave_no_record(settings) -> None:
    with api_client(settings) as client:
        ok = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(2, 2), "application/zip")})
        assert ok.status_code == 201
        bad = client.post("/v1/datasets", files={"file": ("b.zip", b"not a zip", "application/zip")})
        assert bad.status_code in (400, 415, 422)
    assert _reserved(settings) == []


@pytest.mark.parametrize("fail", ["upload", "commit"])
def test_a_failed_dataset_upload_removes_its_objects_and_its_record(settings, monkeypatch, fail) -> None:
    store = store_for(settings)
    if fail == "upload":
        def broken(self, prefix, src):
            raise OSError("disk full")
        monkeypatch.setattr(type(store), "put_tree", broken)
    else:
        from service import idempotency

        def broken_commit(*_args, **_kwargs):
            raise RuntimeError("database went away")
        monkeypatch.setattr(idempotency, "commit_first", broken_commit)
    with api_client(settings) as client:
        try:
            status = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(2, 2), "application/zip")}
                                 ).status_code
        except (OSError, RuntimeError):
            status = 500  # what the app answers; the test client raises it instead
    assert status >= 500
    assert [o.key for o in store.list("datasets")] == [] and _reserved(settings) == []


def test_a_delete_while_the_store_is_away_succeeds_and_the_sweep_removes_the_files(
    make_settings, monkeypatch
) -> None:
    from service.storage import StoreUnavailable
    from service.storage.local import LocalStore

    settings = make_settings(unpublished_after_s="0.2")
    with api_client(settings) as client:
        ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(2, 2), "application/zip")}).json()
        real = LocalStore.delete_tree

        def away(self, prefix):
            raise StoreUnavailable("s3://bucket/zoofit: cannot reach http://minio:9000")

        monkeypatch.setattr(LocalStore, "delete_tree", away)
        assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204  # the record is gone for good
        assert client.get(f"/v1/datasets/{ds['id']}").status_code == 404
        monkeypatch.setattr(LocalStore, "delete_tree", real)
    store = store_for(settings)
    assert len(list(store.list(f"datasets/{ds['id']}"))) == 4 and _reserved(settings) == [f"datasets/{ds['id']}"]
    time.sleep(0.3)
    assert unpublished.sweep(settings) == [f"datasets/{ds['id']}"]
    assert list(store.list(f"datasets/{ds['id']}")) == [] and _reserved(settings) == []


def test_the_sweep_runs_even_when_the_reconcile_pass_fails(make_settings, monkeypatch, tmp_path) -> None:
    import workers.reconcile

    settings = make_settings(unpublished_after_s="0.01")
    unpublished.reserve(settings, "models/dead")
    store_for(settings).put_tree("models/dead", _tree(tmp_path / "a"))
    time.sleep(0.05)

    def broker_away(*_args, **_kwargs):
        raise ConnectionError("redis went away")

    monkeypatch.setattr(workers.reconcile, "reconcile", broker_away)
    workers.reconcile.reconcile_pass(settings, lambda _job_id: None)
    assert list(store_for(settings).list("models/dead")) == [] and _reserved(settings) == []
