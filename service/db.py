"""Persistence: datasets, jobs, trained models and their exports (SQLAlchemy 2; SQLite or PostgreSQL).

The database is the source of truth for a job's state; the broker only carries the id.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Integer,
    Select,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, Result
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from service.config import Settings, get_settings
from service.errors import Unavailable

log = logging.getLogger("zoofit.db")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class JobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default="default")
    name: Mapped[str] = mapped_column(String(255))
    classes: Mapped[list[Any]] = mapped_column(JSON)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_images: Mapped[int] = mapped_column(Integer)
    skipped: Mapped[list[Any]] = mapped_column(JSON, default=list)
    store_key: Mapped[str] = mapped_column(Text)  # its images: <store_key>/<class>/<file> (service.storage)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default="default")
    dataset_id: Mapped[str] = mapped_column(String(32), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    model_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class JobEventRow(Base):
    """One thing that happened to a job, for its event stream (``service.events``); append-only.

    Written in the transaction of the change it describes. The id increases in commit order
    within a job: every append first locks the job's row (``service.events.append_event``).
    """

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default="default")
    # One model per job, held by the database too (a worker that lost its job must not add a
    # second). Revision 0001 has it; databases of releases before it was added fail the check of
    # ``zoofit db upgrade`` (service.schema) until it is added by hand.
    job_id: Mapped[str] = mapped_column(String(32), index=True, unique=True)
    dataset_id: Mapped[str] = mapped_column(String(32), index=True)
    classes: Mapped[list[Any]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    store_key: Mapped[str] = mapped_column(Text)  # its files: <store_key>/manifest.json, ... (service.storage)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExportRow(Base):
    """A model exported as a bundle (``service.exports``); one per model, format and quantization."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("model_id", "format", "quantization"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default="default")
    model_id: Mapped[str] = mapped_column(String(32), index=True)
    format: Mapped[str] = mapped_column(String(16))
    quantization: Mapped[str] = mapped_column(String(16), default="none")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    store_key: Mapped[str | None] = mapped_column(Text, nullable=True)  # the bundle, once built
    size_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiKeyRow(Base):
    """An API key; only the SHA-256 of the (high-entropy) key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyRow(Base):
    """Which resource a retried request with the same ``Idempotency-Key`` refers to."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant", "endpoint", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UnpublishedRow(Base):
    """A store key being written that no record names yet (``service.unpublished``)."""

    __tablename__ = "unpublished"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


def page(session: Session, query: Select[Any], offset: int, limit: int) -> tuple[list[Any], int]:
    """One page of ``query`` (newest first by ``created_at`` of its entity) and the total count."""
    entity = query.column_descriptions[0]["entity"]
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    rows = session.scalars(query.order_by(entity.created_at.desc()).offset(offset).limit(limit)).all()
    return list(rows), total


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE/DELETE (typed: ``execute`` returns a CursorResult for DML)."""
    return int(getattr(result, "rowcount", 0))


def make_engine(url: str, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """An engine for ``url``; on a server database, a pool of ``pool_size`` connections (+ ``max_overflow``)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a worker process writes progress.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow)


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _engine_for(url: str, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """This process's one engine for ``url`` (made with the pool sizes of its first caller)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url, pool_size, max_overflow)
        return engine


# URLs whose schema this process has upgraded or checked (service.schema.prepare_schema).
_schema_ready: set[str] = set()
_schema_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    """The engine of the configured database, its schema upgraded or checked on first use.

    Raises:
        service.schema.SchemaError: the database is not at this release's schema and this process
            may not upgrade it (``db_auto_upgrade``); the message names ``zoofit db upgrade``.
    """
    settings = settings or get_settings()
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = _engine_for(url, settings.db_pool_size, settings.db_max_overflow)
    if url not in _schema_ready:
        from service.schema import prepare_schema

        with _schema_lock:
            if url not in _schema_ready:
                prepare_schema(engine, Base.metadata, auto_upgrade=settings.resolved_db_auto_upgrade)
                _schema_ready.add(url)
    return engine


@lru_cache
def _sessionmaker_for(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=_engine_for(url), expire_on_commit=False)


def new_session(settings: Settings | None = None) -> Session:
    """A session on the configured database; the caller commits (:func:`commit`) and closes it."""
    settings = settings or get_settings()
    get_engine(settings)
    return _sessionmaker_for(settings.resolved_database_url)()


def commit(session: Session) -> None:
    """Commit, or raise :class:`Unavailable` (503) so that no caller answers as if the change were stored.

    Called before a response is sent and before files are removed: a failed commit rolls the
    change back, and the client must hear that rather than a 2xx for something that never happened.
    """
    try:
        session.commit()
    except SQLAlchemyError as exc:
        log.error("commit failed, the change was rolled back: %s", exc)
        with contextlib.suppress(SQLAlchemyError):  # a dead connection may refuse the rollback too
            session.rollback()
        raise Unavailable(
            "the change was not saved: the database failed to commit it, so nothing was changed; retry the request"
        ) from exc


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = new_session(settings)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
