"""The PostgreSQL pool sizes are settings (every process of every host counts against max_connections)."""

from __future__ import annotations

import pytest

from service.db import get_engine, new_session


@pytest.mark.integration
def test_the_pool_of_a_server_database_follows_the_settings(make_settings, pg_url) -> None:
    settings = make_settings(database_url=pg_url, db_pool_size="2", db_max_overflow="1")
    engine = get_engine(settings)
    assert (engine.pool.size(), engine.pool._max_overflow) == (2, 1)  # type: ignore[attr-defined]
    with new_session(settings) as s:
        assert s.get_bind() is engine
