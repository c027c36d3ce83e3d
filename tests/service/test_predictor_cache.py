"""The API's cache of loaded models under races: delete during a load, failed loads, concurrency."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.manifest import ArtifactError
from service import models_store
from service.errors import NotFound
from service.models_store import PredictorCache


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch):
    """``load_predictor`` replaced by one that waits for ``release`` and counts its calls."""
    import models.artifact

    state = {"calls": 0, "release": threading.Event(), "started": threading.Event(), "fail": None}

    def fake_load(path: Path, device: str | None = None, **_runtime: object) -> object:
        state["calls"] += 1
        state["started"].set()
        assert state["release"].wait(10)
        if state["fail"] is not None:
            raise state["fail"]
        return object()

    monkeypatch.setattr(models.artifact, "load_predictor", fake_load)
    return state


def test_a_model_deleted_while_it_loads_is_not_cached_and_answers_404(loads, tmp_path: Path) -> None:
    cache = PredictorCache(capacity=4)
    out: dict[str, object] = {}

    def predict() -> None:
        try:
            out["value"] = cache.get("m1", tmp_path)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    t = threading.Thread(target=predict)
    t.start()
    assert loads["started"].wait(10)
    cache.evict("m1")  # what delete_model does, while the load is under way
    loads["release"].set()
    t.join(10)
    assert isinstance(out.get("error"), NotFound), out
    assert len(cache) == 0


def test_a_failed_load_is_not_kept_and_the_next_request_loads_again(loads, tmp_path: Path) -> None:
    cache = PredictorCache(capacity=4)
    loads["release"].set()
    loads["fail"] = ArtifactError("cannot read manifest.json")
    with pytest.raises(ArtifactError):
        cache.get("m2", tmp_path)  # the folder exists: a broken model, not a missing one
    assert cache._loading == {}  # nothing left behind by the failure
    loads["fail"] = None
    assert cache.get("m2", tmp_path) is not None and loads["calls"] == 2


def test_a_model_whose_folder_is_gone_answers_404(loads, tmp_path: Path) -> None:
    cache = PredictorCache(capacity=4)
    loads["release"].set()
    loads["fail"] = ArtifactError("cannot read manifest.json")
    with pytest.raises(NotFound, match="m3"):
        cache.get("m3", tmp_path / "deleted")


def test_concurrent_requests_load_a_model_once(loads, tmp_path: Path) -> None:
    cache = PredictorCache(capacity=4)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("m4", tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    assert loads["started"].wait(10)
    loads["release"].set()
    for t in threads:
        t.join(10)
    assert loads["calls"] == 1 and len(got) == 8 and len({id(g) for g in got}) == 1
    assert models_store.PredictorCache is PredictorCache
