"""Alembic's environment: migrate ``service.db.Base.metadata``.

``service.schema`` hands over an open connection (``config.attributes["connection"]``), inside
the transaction that also holds the migration lock; without one (the ``alembic`` command line
with ``-c`` pointing at a config of its own) the settings' database URL is used.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from service.config import get_settings
from service.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def include_name(name: str | None, type_: str, _parent: Any) -> bool:
    # Tables this code does not own (e.g. kombu's, should the broker share the database) are neither
    # compared nor dropped by autogenerate.
    if type_ == "table":
        return name in target_metadata.tables
    return True


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=include_name,
        compare_type=True,
        # SQLite cannot ALTER most things: alembic rebuilds the table instead ("batch" mode).
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url,
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
