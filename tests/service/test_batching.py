"""Micro-batching of predictions: the batcher on its own (asyncio) and through the predict endpoint.

Every test runs a real tiny trained model. Waits that must not expire are long (a batch is made
full instead), so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.artifact import Predictor, load_predictor
from models.data import open_image
from service.batching import InferenceFailed, MicroBatcher
from service.db import ModelRow, session_scope
from service.sample_data import png_bytes
from tests.fuzz.conftest import Trained, trained_client, trained_store
from tests.utils.data import animals

LONG_WAIT_MS = 60_000.0  # a wait that must never expire: batches in these tests are flushed by being full

T = TypeVar("T")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    with trained_store(tmp_path_factory.mktemp("batching") / "data") as t:
        yield t


@pytest.fixture(scope="module")
def model_path(trained: Trained) -> Path:
    with session_scope(trained.settings) as s:
        row = s.get(ModelRow, trained.model_id)
        assert row is not None
        return trained.settings.data_dir / row.store_key


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    _, test = animals(3, 4, 2)
    return [png_bytes(img) for _, _, img in test]


class Spy:
    """Wraps a predictor's ``predict_proba_views``: records each forward pass, can make it fail."""

    def __init__(self, predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int]] = []  # (views, images) per forward pass
        self.threads: list[int] = []
        self.fail: list[Exception] = []  # raised by the next forward passes, one each
        self._original = predictor.predict_proba_views
        monkeypatch.setattr(predictor, "predict_proba_views", self)

    def __call__(self, views: list[torch.Tensor]) -> np.ndarray:
        self.calls.append((len(views), len(views[0])))
        self.threads.append(torch.get_num_threads())
        if self.fail:
            raise self.fail.pop(0)
        return self._original(views)

    @property
    def sizes(self) -> list[int]:
        return [n for _, n in self.calls]


@pytest.fixture
def predictor(model_path: Path) -> Predictor:
    return load_predictor(model_path, device="cpu")


def _images(pngs: list[bytes], n: int, offset: int = 0) -> list:
    return [open_image(pngs[(offset + i) % len(pngs)], f"{i}.png") for i in range(n)]


def run_with(batcher: MicroBatcher, main: Callable[[MicroBatcher], Awaitable[T]]) -> T:
    """Run ``main(batcher)`` in a fresh event loop and close the batcher, as the app's lifespan does."""

    async def _run() -> T:
        try:
            return await main(batcher)
        finally:
            await batcher.aclose()

    return asyncio.run(_run())


def _request(batcher: MicroBatcher, predictor: Predictor, images: list, tta: str = "none") -> Awaitable[np.ndarray]:
    return batcher.predict_proba(predictor, predictor.views(images, tta), tta)


# --- the batcher on its own ------------------------------------------------------------------------


def test_concurrent_requests_share_one_forward_pass_with_unbatched_results(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)
    requests = [_images(pngs, 1, 0), _images(pngs, 2, 1), _images(pngs, 3, 3)]
    expected = [predictor.predict_proba(images) for images in requests]
    spy.calls.clear()  # predict_proba goes through predict_proba_views too

    async def main(b: MicroBatcher) -> list[np.ndarray]:
        return list(await asyncio.gather(*[_request(b, predictor, images) for images in requests]))

    results = run_with(MicroBatcher(max_batch=6, max_wait_ms=LONG_WAIT_MS), main)
    assert spy.calls == [(1, 6)]
    for got, want in zip(results, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_lone_request_is_flushed_by_the_wait(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)
    images = _images(pngs, 2)
    result = run_with(MicroBatcher(max_batch=32, max_wait_ms=1), lambda b: _request(b, predictor, images))
    assert spy.sizes == [2]
    np.testing.assert_allclose(result, predictor.predict_proba(images), rtol=1e-5, atol=1e-6)


def test_no_forward_pass_exceeds_max_batch(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)
    requests = [_images(pngs, 1, 0), _images(pngs, 5, 1), _images(pngs, 1, 2), _images(pngs, 2, 3)]

    async def main(b: MicroBatcher) -> list[np.ndarray]:
        return list(await asyncio.gather(*[_request(b, predictor, images) for images in requests]))

    results = run_with(MicroBatcher(max_batch=2, max_wait_ms=1), main)
    assert max(spy.sizes) <= 2 and sum(spy.sizes) == 9
    for got, images in zip(results, requests, strict=True):
        np.testing.assert_allclose(got, predictor.predict_proba(images), rtol=1e-5, atol=1e-6)


def test_a_request_bigger_than_max_batch_is_split(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)
    images = _images(pngs, 5)
    # The two full chunks run at once; the last one waits its 1 ms for company, then runs alone.
    result = run_with(MicroBatcher(max_batch=2, max_wait_ms=1), lambda b: _request(b, predictor, images))
    assert spy.sizes == [2, 2, 1]
    np.testing.assert_allclose(result, predictor.predict_proba(images), rtol=1e-5, atol=1e-6)


def test_tta_modes_and_models_are_never_mixed(predictor, model_path, pngs, monkeypatch):
    other = load_predictor(model_path, device="cpu")  # the same weights, loaded again: another model
    spies = {"a": Spy(predictor, monkeypatch), "b": Spy(other, monkeypatch)}
    jobs = [(p, tta, i) for p in (predictor, other) for tta in ("none", "hflip", "five_crop") for i in range(2)]

    async def main(b: MicroBatcher) -> list[np.ndarray]:
        return list(await asyncio.gather(*[_request(b, p, _images(pngs, 1, i), tta) for p, tta, i in jobs]))

    results = run_with(MicroBatcher(max_batch=2, max_wait_ms=LONG_WAIT_MS), main)
    for spy in spies.values():
        # one batch of 2 images per TTA mode (1, 2 or 5 views each), never a mix
        assert sorted(spy.calls) == [(1, 2), (2, 2), (5, 2)]
    for got, (p, tta, i) in zip(results, jobs, strict=True):
        np.testing.assert_allclose(got, p.predict_proba(_images(pngs, 1, i), tta), rtol=1e-5, atol=1e-6)


def test_an_error_fails_only_its_batch(predictor, model_path, pngs, monkeypatch):
    healthy = load_predictor(model_path, device="cpu")
    spy = Spy(predictor, monkeypatch)
    spy.fail.append(RuntimeError("boom"))

    async def main(b: MicroBatcher) -> tuple[list[Any], np.ndarray]:
        first = await asyncio.gather(
            _request(b, predictor, _images(pngs, 1, 0)),
            _request(b, predictor, _images(pngs, 1, 1)),
            _request(b, healthy, _images(pngs, 2, 2)),
            return_exceptions=True,
        )
        after = await _request(b, predictor, _images(pngs, 2, 0))  # the batcher keeps serving
        return list(first), after

    (a, b_, c), after = run_with(MicroBatcher(max_batch=2, max_wait_ms=LONG_WAIT_MS), main)
    for err in (a, b_):
        assert isinstance(err, InferenceFailed) and err.status == 500
        assert "RuntimeError: boom" in err.message
    assert a is not b_  # each request gets its own error
    np.testing.assert_allclose(c, healthy.predict_proba(_images(pngs, 2, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after, healthy.predict_proba(_images(pngs, 2, 0)), rtol=1e-5, atol=1e-6)


def test_views_unlike_the_queued_ones_are_refused_before_joining(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)

    async def main(b: MicroBatcher) -> list[np.ndarray]:
        queued = asyncio.ensure_future(_request(b, predictor, _images(pngs, 1)))
        await asyncio.sleep(0)
        hflip_views = predictor.views(_images(pngs, 1), "hflip")
        with pytest.raises(ValueError, match="do not match"):
            await b.predict_proba(predictor, hflip_views, "none")  # mislabelled: 2 views, not 1
        with pytest.raises(ValueError, match="one shape"):
            await b.predict_proba(predictor, [hflip_views[0], hflip_views[0][:0]], "hflip")
        return list(await asyncio.gather(queued, _request(b, predictor, _images(pngs, 1, 1))))

    run_with(MicroBatcher(max_batch=2, max_wait_ms=LONG_WAIT_MS), main)
    assert spy.calls == [(1, 2)]


def test_a_cancelled_request_leaves_the_batch(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)

    async def main(b: MicroBatcher) -> list[np.ndarray]:
        gone = asyncio.ensure_future(_request(b, predictor, _images(pngs, 1)))
        await asyncio.sleep(0)  # queued
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return list(await asyncio.gather(*[_request(b, predictor, _images(pngs, 1, i)) for i in range(2)]))

    results = run_with(MicroBatcher(max_batch=2, max_wait_ms=LONG_WAIT_MS), main)
    assert spy.sizes == [2] and len(results) == 2


def test_aclose_drains_the_queue_and_stops_the_inference_thread(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)

    async def main() -> bool:
        b = MicroBatcher(max_batch=32, max_wait_ms=LONG_WAIT_MS)
        waiting = asyncio.ensure_future(_request(b, predictor, _images(pngs, 3)))
        await asyncio.sleep(0)  # queued, far from its deadline
        await b.aclose()
        return waiting.done() and waiting.result().shape == (3, len(predictor.classes))

    assert asyncio.run(main())
    assert spy.sizes == [3]
    assert not [t for t in threading.enumerate() if t.name.startswith("zoofit-inference")]


def test_the_inference_thread_uses_the_threads_setting(predictor, pngs, monkeypatch):
    spy = Spy(predictor, monkeypatch)
    before = torch.get_num_threads()
    try:
        run_with(MicroBatcher(max_batch=1, max_wait_ms=0, threads=1),
                 lambda b: _request(b, predictor, _images(pngs, 1)))
    finally:
        torch.set_num_threads(before)
    assert spy.threads == [1]


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(max_batch=0, max_wait_ms=5)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(max_batch=1, max_wait_ms=-1)


# --- through the predict endpoint ------------------------------------------------------------------


def _app_predictor(c: TestClient, trained: Trained, model_path: Path) -> Predictor:
    """The predictor the app will use (loaded into its cache now, so a spy can be put on it)."""
    app: Any = c.app
    key = model_path.relative_to(trained.settings.data_dir).as_posix()  # its store key
    return app.state.predictors.get(trained.model_id, key)  # type: ignore[no-any-return]


def _post_all(c: TestClient, trained: Trained, requests: list[dict[str, Any]]) -> list[Any]:
    """POST the requests (``files`` and ``params``) to /predict concurrently, from threads."""

    def post(req: dict[str, Any]) -> Any:
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(req["files"])]
        return c.post(f"/v1/models/{trained.model_id}/predict", files=files, params=req.get("params", {}))

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(post, requests))


def _distribution(prediction: dict[str, Any], classes: list[str]) -> list[float]:
    by_label = {t["label"]: t["probability"] for t in prediction["top_k"]}
    return [by_label[c] for c in classes]


def test_http_concurrent_requests_share_a_forward_pass(trained, model_path, pngs, monkeypatch):
    with trained_client(trained, predict_batch_max=4, predict_batch_wait_ms=LONG_WAIT_MS) as c:
        predictor = _app_predictor(c, trained, model_path)
        spy = Spy(predictor, monkeypatch)
        requests = [{"files": [pngs[0]]}, {"files": [pngs[1], pngs[2]]}, {"files": [pngs[3]]}]
        responses = _post_all(c, trained, requests)
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert spy.calls == [(1, 4)]
    classes = predictor.classes
    for r, req in zip(responses, requests, strict=True):
        preds = r.json()["predictions"]
        assert [p["file"] for p in preds] == [f"{i}.png" for i in range(len(req["files"]))]
        got = np.array([_distribution(p, classes) for p in preds])
        want = predictor.predict_proba([open_image(data, "x.png") for data in req["files"]])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_http_tta_modes_get_separate_batches_and_top_k_is_capped(trained, model_path, pngs, monkeypatch):
    with trained_client(trained, predict_batch_max=2, predict_batch_wait_ms=LONG_WAIT_MS) as c:
        spy = Spy(_app_predictor(c, trained, model_path), monkeypatch)
        requests = [{"files": [pngs[i]], "params": {"tta": tta, "top_k": 50}} for tta in ("none", "hflip")
                    for i in range(2)]
        responses = _post_all(c, trained, requests)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert sorted(spy.calls) == [(1, 2), (2, 2)]
    assert all(len(r.json()["predictions"][0]["top_k"]) == 2 for r in responses)  # capped at the 2 classes


def test_http_request_bigger_than_max_batch(trained, model_path, pngs, monkeypatch):
    with trained_client(trained, predict_batch_max=2, predict_batch_wait_ms=0) as c:
        predictor = _app_predictor(c, trained, model_path)
        spy = Spy(predictor, monkeypatch)
        (r,) = _post_all(c, trained, [{"files": pngs[:5], "params": {"top_k": 2}}])
    assert r.status_code == 200, r.text
    assert spy.sizes == [2, 2, 1]
    got = np.array([_distribution(p, predictor.classes) for p in r.json()["predictions"]])
    want = predictor.predict_proba([open_image(data, "x.png") for data in pngs[:5]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_http_failed_batch_is_500_for_its_requests_and_the_service_keeps_serving(trained, model_path, pngs,
                                                                                 monkeypatch):
    with trained_client(trained, predict_batch_max=2, predict_batch_wait_ms=LONG_WAIT_MS) as c:
        spy = Spy(_app_predictor(c, trained, model_path), monkeypatch)
        spy.fail.append(RuntimeError("the forward pass broke"))
        failed = _post_all(c, trained, [{"files": [pngs[0]]}, {"files": [pngs[1]]}])
        spy.fail.append(MemoryError())
        out_of_memory = _post_all(c, trained, [{"files": [pngs[0]]}, {"files": [pngs[1]]}])
        after = _post_all(c, trained, [{"files": [pngs[0]]}, {"files": [pngs[1]]}])
    assert [r.status_code for r in failed] == [500, 500]
    assert all("prediction failed: RuntimeError: the forward pass broke" in r.json()["detail"] for r in failed)
    assert [r.status_code for r in out_of_memory] == [503, 503]
    assert all("not enough memory" in r.json()["detail"] for r in out_of_memory)
    assert [r.status_code for r in after] == [200, 200]
    assert spy.sizes == [2, 2, 2]


def test_http_bad_image_is_still_400_and_never_reaches_the_batcher(trained, model_path, pngs, monkeypatch):
    with trained_client(trained) as c:
        spy = Spy(_app_predictor(c, trained, model_path), monkeypatch)
        (r,) = _post_all(c, trained, [{"files": [pngs[0], b"\xff\xd8\xff garbage"]}])
    assert r.status_code == 400 and "1.png" in r.json()["detail"]
    assert spy.calls == []
