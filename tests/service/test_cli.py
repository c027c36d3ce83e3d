"""``zoofit serve`` splits the cores between the API and its worker unless told otherwise."""

from __future__ import annotations

import os

import pytest

from service import cli
from service.config import get_settings


@pytest.mark.parametrize(
    ("cores", "concurrency", "expected"),
    [(1, 1, (1, 1)), (2, 1, (1, 1)), (8, 1, (2, 6)), (16, 2, (4, 6)), (2, 4, (1, 1))],
)
def test_split_threads(cores: int, concurrency: int, expected: tuple[int, int]) -> None:
    api, worker = cli.split_threads(cores, concurrency)
    assert (api, worker) == expected
    assert api >= 1 and worker >= 1


def _serve_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, str | None]:
    for key in ("ZOOFIT_TORCH_THREADS", "ZOOFIT_PREDICT_THREADS"):
        # setenv first so that teardown restores the original state even after serve() sets them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen: dict[str, str | None] = {}

    class Child:
        def send_signal(self, sig: int) -> None: ...

        def wait(self, timeout: float | None = None) -> int:
            return 0

    def worker() -> Child:
        seen["worker_torch"] = os.environ.get("ZOOFIT_TORCH_THREADS")
        return Child()

    def api(host: str | None, port: int | None) -> None:
        seen["api_predict"] = os.environ.get("ZOOFIT_PREDICT_THREADS")
        seen["settings_predict"] = str(get_settings().predict_threads)

    monkeypatch.setattr(cli, "start_worker_process", worker)
    monkeypatch.setattr(cli, "run_api", api)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda _pid: set(range(8)))
    get_settings.cache_clear()
    try:
        cli.serve(None, None)
    finally:
        get_settings.cache_clear()
    return seen


def test_serve_splits_the_cores_when_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _serve_env(monkeypatch)
    assert seen == {"worker_torch": "6", "api_predict": "2", "settings_predict": "2"}


def test_serve_keeps_an_explicit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _serve_env(monkeypatch, ZOOFIT_TORCH_THREADS="3")
    assert seen["worker_torch"] == "3" and seen["api_predict"] is None

