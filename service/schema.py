"""The database schema's version: upgrade it (Alembic, ``service/migrations``), or check it at start.

``zoofit db upgrade`` runs :func:`upgrade`. The API and the workers call :func:`prepare_schema`
when they first touch the database: with ``auto_upgrade`` (the default on SQLite, the embedded
setup) they upgrade it themselves; without it (the default on PostgreSQL) they refuse to start on
a database that is not at this release's head revision, naming ``zoofit db upgrade``. On a shared
database a schema change is a deliberate step of the deployment (taken once, after a backup, by
the compose file's one-shot ``migrate`` service): not something every replica of a rolling update
does at start, while the previous release's processes still run against it.

Two processes upgrading at once take turns: a transaction-scoped advisory lock on PostgreSQL,
an exclusive ``flock`` on a file beside the database on SQLite. The second finds the work done.

A database made before migrations existed (by ``Base.metadata.create_all``; no
``alembic_version`` table) is recognised by its tables: it is stamped at the revision its tables
match (``0001`` for release 5fd83c4, ``0002`` once ``job_events`` exists), upgraded, and then
compared column by column, index by index, with this release's models. Any difference rolls the
whole upgrade back (one transaction) and is reported; nothing is changed then.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData, func, inspect, select
from sqlalchemy.engine import Connection, Engine, make_url

log = logging.getLogger("zoofit.schema")

UPGRADE_COMMAND = "zoofit db upgrade"
# pg_advisory_xact_lock key of schema upgrades ("zoofit" in ASCII).
ADVISORY_LOCK_KEY = 0x7A6F6F666974

# Releases before migrations, newest first: the revision a create_all database of that release is
# stamped at, and the tables it has. A table added by a later revision goes into a new entry here
# only if some release created it with create_all (none will again: create_all is gone).
_BASELINE_TABLES = frozenset({"datasets", "jobs", "models", "api_keys", "idempotency_keys"})
LEGACY_RELEASES: tuple[tuple[str, frozenset[str]], ...] = (
    ("0003", _BASELINE_TABLES | {"job_events", "exports"}),
    ("0002", _BASELINE_TABLES | {"job_events"}),
    ("0001", _BASELINE_TABLES),
)


class SchemaError(RuntimeError):
    """The database's schema is not one this release can run on; the message says what to do."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code (the revisions ship inside the ``service`` package)."""
    config = Config()
    config.set_main_option("script_location", "service:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its revisions
        raise SchemaError("no migration revisions found in service/migrations/versions")
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at; None for a database without ``alembic_version``."""
    return MigrationContext.configure(conn).get_current_revision()


def known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def schema_differences(conn: Connection, metadata: MetaData) -> list[Any]:
    """What autogenerate would change to make the database match ``metadata`` (empty: it matches).

    ``metadata`` is ``service.db.Base.metadata`` (passed in: ``service.db`` calls this module).
    """

    def include_name(name: str | None, type_: str, _parent: Any) -> bool:
        # The same filter as env.py: only this code's tables are compared.
        return name in metadata.tables if type_ == "table" else True

    context = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": include_name})
    return list(compare_metadata(context, metadata))


def _legacy_revision(conn: Connection, metadata: MetaData) -> str | None:
    """The revision a database without ``alembic_version`` is stamped at; None when it has no table of ours.

    Raises:
        SchemaError: it has some of the tables, but those of no release.
    """
    tables = set(inspect(conn).get_table_names()) & set(metadata.tables)
    if not tables:
        return None
    for revision, release_tables in LEGACY_RELEASES:
        if tables == release_tables:
            return revision
    missing = sorted(_BASELINE_TABLES - tables)
    raise SchemaError(
        f"the database has zoofit tables ({', '.join(sorted(tables))}) but no alembic_version table, and they are "
        f"not those of a known release (missing: {', '.join(missing) or 'none'}); nothing was changed"
    )


@contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the schema lock; commits when the block ends without error."""
    if engine.dialect.name == "sqlite":
        with _sqlite_file_lock(engine), engine.connect() as conn, conn.begin():
            yield conn
        return
    with engine.connect() as conn, conn.begin():
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(ADVISORY_LOCK_KEY)))
        yield conn


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    database = make_url(str(engine.url)).database
    if not database or database == ":memory:":
        yield  # a private in-memory database: no other process sees it
        return
    lock_path = Path(database + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def upgrade(engine: Engine, metadata: MetaData, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the database to ``revision``; returns the revisions before and after.

    ``metadata`` (``service.db.Base.metadata``) is what a pre-migration database is checked against.

    A database made before migrations is recognised, stamped, upgraded and checked (see the
    module's docstring). Everything happens in one transaction, under the schema lock.

    Raises:
        SchemaError: the database is at a revision this release does not know (a newer release
            upgraded it), or a pre-migration database whose tables differ from the models.
    """
    with migration_lock(engine) as conn:
        before = current_revision(conn)
        if before is not None and not known_revision(before):
            raise SchemaError(
                f"the database is at revision {before}, which this release does not know: a newer release "
                f"upgraded it; run that release (or downgrade the database with it)"
            )
        legacy = _legacy_revision(conn, metadata) if before is None else None
        if legacy is not None:
            log.info("the database was made before migrations (tables of revision %s): stamping it", legacy)
            command.stamp(alembic_config(conn), legacy)
        command.upgrade(alembic_config(conn), revision)
        if legacy is not None and revision == "head":
            differences = schema_differences(conn, metadata)
            if differences:
                # Raising rolls back the stamp and the upgrade with it.
                raise SchemaError(
                    "the database was made before migrations, but its tables differ from this release's "
                    f"models, so nothing was changed: {_describe(differences)}"
                )
        after = current_revision(conn)
    if before != after:
        log.info("database schema upgraded: %s -> %s", before or "empty", after)
    return before, after


def _describe(differences: list[Any]) -> str:
    parts = []
    for diff in differences[:10]:
        item = diff[0] if isinstance(diff, list) else diff  # modify_* diffs come as lists
        kind, *rest = item
        named = next((getattr(r, "name", None) for r in rest if getattr(r, "name", None)), None)
        where = ".".join(str(r) for r in rest[1:3] if isinstance(r, str)) if kind.startswith("modify") else None
        parts.append(f"{kind} {where or named or ''}".strip())
    more = f" and {len(differences) - 10} more" if len(differences) > 10 else ""
    return "; ".join(parts) + more


def prepare_schema(engine: Engine, metadata: MetaData, *, auto_upgrade: bool) -> None:
    """Make sure this process can run on the database: upgrade it, or check that it is at head.

    Raises:
        SchemaError: without ``auto_upgrade``, the database is not at this release's head; the
            message names ``zoofit db upgrade``.
    """
    if auto_upgrade:
        upgrade(engine, metadata)
        return
    head = head_revision()
    with engine.connect() as conn:
        current = current_revision(conn)
        legacy = None
        if current is None:
            with contextlib.suppress(SchemaError):
                legacy = _legacy_revision(conn, metadata)
    if current == head:
        return
    if current is not None and not known_revision(current):
        raise SchemaError(
            f"the database is at revision {current}, which this release does not know (head {head}): a newer "
            f"release upgraded it; run that release"
        )
    if current is None:
        state = "was made by a release before migrations" if legacy else "has no zoofit schema yet"
    else:
        state = f"is at revision {current}"
    raise SchemaError(
        f"the database {state}; this release needs revision {head}. Run `{UPGRADE_COMMAND}` "
        f"(with the same ZOOFIT_DATABASE_URL) before starting the API and the workers"
    )
