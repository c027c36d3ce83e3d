"""Hypothesis settings for the fuzz tests: bounded and reproducible in CI, deeper on demand.

``ZOOFIT_TEST_FUZZ_SCALE=20 pytest tests/fuzz`` multiplies every example budget by 20 and
draws fresh random inputs instead of the fixed CI sequence.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from service.config import Settings, get_settings
from tests.conftest import api_client, issue_key
from tests.conftest import pg_database as _pg_database
from tests.utils.data import TINY_JOB, animals_zip

FUZZ_SCALE = max(1, int(os.environ.get("ZOOFIT_TEST_FUZZ_SCALE", "1")))


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples * FUZZ_SCALE,
        deadline=None,
        derandomize=FUZZ_SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


@dataclass(frozen=True)
class Trained:
    """A data folder holding one dataset and one model trained on it, owned by tenant ``fuzz``."""

    settings: Settings
    key: str
    dataset_id: str
    model_id: str


@contextmanager
def trained_client(trained: Trained, **overrides: object) -> Iterator[TestClient]:
    """A client of a fresh app on the trained model's data folder, with settings changed for one test."""
    from service.app import create_app

    s = trained.settings.model_copy(update=overrides)
    app = create_app(s)
    app.dependency_overrides[get_settings] = lambda: s
    with TestClient(app, headers={"Authorization": f"Bearer {trained.key}"}) as c:
        yield c


@contextmanager
def trained_store(data_dir: Path, database_url: str | None = None) -> Iterator[Trained]:
    """Train the tiny recipe once, with the worker function called directly (no broker)."""
    from workers.jobs import run_job

    mp = pytest.MonkeyPatch()
    for name in [k for k in os.environ if k.startswith("ZOOFIT_") and not k.startswith("ZOOFIT_TEST_")]:
        mp.delenv(name)
    mp.setenv("ZOOFIT_DATA_DIR", str(data_dir))
    mp.setenv("ZOOFIT_TORCH_THREADS", "2")
    if database_url:
        mp.setenv("ZOOFIT_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        s = get_settings()
        s.ensure_dirs()
        key = issue_key(s, "fuzz", admin=True)
        with api_client(s, tenant=None, enqueue=lambda _job_id: None) as c:
            c.headers["Authorization"] = f"Bearer {key}"
            ds = c.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")})
            assert ds.status_code == 201, ds.text
            job = c.post("/v1/jobs", json={"dataset_id": ds.json()["id"], **TINY_JOB, "epochs": 1}).json()
            assert run_job(job["id"], settings=s) == "succeeded"
            model_id = c.get(f"/v1/jobs/{job['id']}").json()["model_id"]
        yield Trained(s, key, ds.json()["id"], model_id)
    finally:
        get_settings.cache_clear()
        mp.undo()


def pg_database() -> AbstractContextManager[str]:
    """A fresh database on the test PostgreSQL server for a whole module, dropped afterwards."""
    return _pg_database("zoofit_fuzz")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """A tiny trained model on the embedded store, shared by a module's tests."""
    with trained_store(tmp_path_factory.mktemp("trained") / "data") as t:
        yield t
