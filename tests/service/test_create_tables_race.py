"""An API and a worker that start at the same moment on a fresh database both create its tables."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect

from service.db import Base, create_tables, make_engine


def _race(url: str) -> list[BaseException]:
    engines = [make_engine(url) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start(engine) -> None:
        barrier.wait()
        try:
            create_tables(engine)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(inspect(engines[0]).get_table_names()) >= set(Base.metadata.tables)
    for e in engines:
        e.dispose()
    return errors


def test_two_processes_creating_the_sqlite_tables_at_once_both_start(tmp_path):
    # Before the fix every one of these failed with "table datasets already exists".
    for i in range(10):
        assert _race(f"sqlite:///{tmp_path}/race{i}.db") == []


@pytest.mark.integration
def test_two_processes_creating_the_postgres_tables_at_once_both_start(pg_url):
    assert _race(pg_url) == []
