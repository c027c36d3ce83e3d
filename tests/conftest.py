"""Shared fixtures: isolated settings per test, an API client, real Redis/PostgreSQL URLs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.config import Settings, get_settings

PG_ADMIN_URL = os.environ.get("ZOOFIT_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ZOOFIT_TEST_REDIS", "redis://127.0.0.1:6379/11")


def _clear_caches() -> None:
    get_settings.cache_clear()
    try:
        from service.queue import get_celery

        get_celery.cache_clear()
    except ImportError:
        pass


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point every ``get_settings()`` in this process (and child processes) at a fresh setup."""

    def _make(**env: str) -> Settings:
        for key in list(os.environ):
            if key.startswith("ZOOFIT_") and not key.startswith("ZOOFIT_TEST_"):
                monkeypatch.delenv(key)
        monkeypatch.setenv("ZOOFIT_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("ZOOFIT_TORCH_THREADS", "2")
        for k, v in env.items():
            monkeypatch.setenv(f"ZOOFIT_{k.upper()}", v)
        _clear_caches()
        s = get_settings()
        s.ensure_dirs()
        return s

    yield _make
    _clear_caches()


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture
def enqueued() -> list[str]:
    return []


def issue_key(settings: Settings, tenant: str, admin: bool = False) -> str:
    from service.auth import create_key
    from service.db import session_scope

    with session_scope(settings) as session:
        return create_key(session, tenant, admin=admin)[1]


def api_client(settings: Settings, tenant: str | None = "alice", enqueue=None):
    """A TestClient for ``create_app(settings)`` holding a fresh key of ``tenant`` (None: no key)."""
    from fastapi.testclient import TestClient

    from service.api.deps import get_enqueue
    from service.app import create_app

    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    if enqueue is not None:
        app.dependency_overrides[get_enqueue] = lambda: enqueue
    headers = {"Authorization": f"Bearer {issue_key(settings, tenant)}"} if tenant else {}
    return TestClient(app, headers=headers)


@pytest.fixture
def client(settings: Settings, enqueued: list[str]) -> Iterator:
    """The API in-process as tenant 'alice'; enqueued job ids are recorded instead of sent to a broker."""
    with api_client(settings, "alice", enqueued.append) as c:
        yield c


@contextmanager
def pg_database(prefix: str = "zoofit_test", *, migrated: bool = True) -> Iterator[str]:
    """A fresh database on the test PostgreSQL server, dropped afterwards.

    ``migrated``: at this release's schema (``zoofit db upgrade``), as a deployment has it before
    the API and the workers start (on PostgreSQL they do not upgrade it themselves); else empty.
    """
    from sqlalchemy import create_engine, text

    from service.db import Base, _engine_for, make_engine
    from service.schema import upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - environment problem, say so loudly
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not usable: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        if migrated:
            engine = make_engine(url)
            upgrade(engine, Base.metadata)
            engine.dispose()
        yield url
    finally:
        _engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the real server for one test."""
    with pg_database() as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database on the real server, flushed before and after."""
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.flushdb()
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"Redis at {REDIS_URL} is not usable: {exc}")
    yield REDIS_URL
    r.flushdb()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server in a child process, for the whole session; yields its endpoint URL.

    A process of its own (real HTTP on loopback), so worker processes that tests start reach it too.
    """
    from tests.utils.s3 import moto_server

    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def s3_settings_env(s3_server: str) -> Iterator[dict[str, str]]:
    """``ZOOFIT_*`` variables for a fresh bucket of its own on the test S3 server (``s3://<bucket>/zoofit``)."""
    from tests.utils.s3 import drop_bucket, new_bucket, s3_env

    bucket = new_bucket(s3_server)
    yield s3_env(s3_server, bucket)
    drop_bucket(s3_server, bucket)


@pytest.fixture
def s3_settings(make_settings, s3_settings_env: dict[str, str]) -> Settings:
    """``settings`` with the artifact store in a fresh bucket on the test S3 server (child processes too)."""
    from tests.utils.s3 import settings_kwargs

    return make_settings(**settings_kwargs(s3_settings_env))
