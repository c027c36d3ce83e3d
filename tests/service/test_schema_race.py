"""An API and a worker that start at the same moment on a fresh database both upgrade its schema.

The schema lock (a file lock on SQLite, an advisory lock on PostgreSQL) makes them take turns:
the second finds the database at head and has nothing to do.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect

from service.db import Base, make_engine
from service.schema import current_revision, head_revision, upgrade


def _race(url: str) -> list[BaseException]:
    engines = [make_engine(url) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start(engine) -> None:
        barrier.wait()
        try:
            upgrade(engine, Base.metadata)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(inspect(engines[0]).get_table_names()) >= set(Base.metadata.tables) | {"alembic_version"}
    with engines[0].connect() as conn:
        assert current_revision(conn) == head_revision()
    for e in engines:
        e.dispose()
    return errors


def test_two_processes_upgrading_a_fresh_sqlite_database_at_once_both_start(tmp_path):
    for i in range(5):
        assert _race(f"sqlite:///{tmp_path}/race{i}.db") == []


@pytest.mark.integration
def test_two_processes_upgrading_a_fresh_postgres_database_at_once_both_start():
    from tests.conftest import pg_database

    for _ in range(3):
        with pg_database(migrated=False) as url:
            assert _race(url) == []
