"""Objects in the store that no record names: what a process killed between upload and commit leaves.

A tree (a dataset's images, a model) or a bundle is written to the store before the row that
publishes it is committed. So that a crash in between leaves nothing behind for good, the key is
recorded first, in a transaction of its own (``reserve``), and the publishing transaction removes
that record (``publish``). A record still there after ``unpublished_after_s`` names objects of a
writer that died: ``sweep`` (run by every worker's reconciler) removes them, then the record.

``publish`` fails when the record is gone (a sweep took it for a writer that stalled past the
limit): the publishing transaction rolls back, so no row ever names removed objects.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import UnpublishedRow, commit, new_session, rowcount, session_scope, utcnow
from service.errors import Unavailable
from service.storage import StoreUnavailable, store_for

log = logging.getLogger("zoofit.storage")


class Unpublishable(Unavailable):
    """The key's record was swept before it was published (the writer stalled past ``unpublished_after_s``):
    a 503, the request may be sent again."""


def reserve(settings: Settings, key: str) -> None:
    """Record that ``key`` is about to be written (committed before the first byte goes out).

    Raises:
        Unavailable: the database could not commit it (then nothing may be written).
    """
    session = new_session(settings)
    try:
        session.merge(UnpublishedRow(key=key, created_at=utcnow()))
        commit(session)
    finally:
        session.close()


def publish(session: Session, key: str) -> None:
    """In the transaction that commits the row naming ``key``: the objects are no longer unpublished.

    Raises:
        Unpublishable: a sweep removed the record (and so the objects) meanwhile.
    """
    if not rowcount(session.execute(delete(UnpublishedRow).where(UnpublishedRow.key == key))):
        raise Unpublishable(f"{key} took longer than ZOOFIT_UNPUBLISHED_AFTER_S to store and was removed; retry")


def release(settings: Settings, key: str) -> None:
    """Forget ``key`` once its writer has removed what it wrote (an upload that failed or lost)."""
    with session_scope(settings) as s:
        s.execute(delete(UnpublishedRow).where(UnpublishedRow.key == key))


def discard(settings: Settings, key: str) -> None:
    """Remove what was written under ``key`` (a tree or one object), then its record.

    A record the database cannot remove now stays; the sweep finds its objects gone later.
    """
    store = store_for(settings)
    store.delete_tree(key)
    store.delete(key)
    try:
        release(settings, key)
    except SQLAlchemyError as exc:
        log.warning("removed %s, but not its record (%s); the sweep drops it later", key, exc)


def hand_over(session: Session, key: str) -> None:
    """In the transaction that deletes the row naming ``key``: its objects become the sweep's should
    ``remove`` not get to them (the store away, the process killed)."""
    session.merge(UnpublishedRow(key=key, created_at=utcnow()))


def remove(settings: Settings, key: str) -> None:
    """Remove the objects of a deleted row (``hand_over``), then the record; with the store away, the
    record stays and the sweep removes them later."""
    try:
        discard(settings, key)
    except StoreUnavailable as exc:
        log.warning("could not remove %s now (%s); the sweep removes it later", key, exc)


def sweep(settings: Settings) -> list[str]:
    """Remove the objects of every key reserved more than ``unpublished_after_s`` ago and never published."""
    cutoff = utcnow() - timedelta(seconds=settings.unpublished_after_s)
    with session_scope(settings) as s:
        keys = list(s.scalars(select(UnpublishedRow.key).where(UnpublishedRow.created_at < cutoff).limit(100)))
    swept = []
    for key in keys:
        # The record goes first (guarded by its age), so a late publish fails instead of naming
        # objects about to be removed; of several sweepers, one removes it.
        with session_scope(settings) as s:
            taken = rowcount(s.execute(
                delete(UnpublishedRow).where(UnpublishedRow.key == key, UnpublishedRow.created_at < cutoff)
            ))
        if not taken:
            continue
        try:
            store = store_for(settings)
            store.delete_tree(key)
            store.delete(key)
        except StoreUnavailable as exc:
            log.warning("could not remove the abandoned upload %s: %s; trying again later", key, exc)
            reserve(settings, key)  # back, with a fresh age: the next sweep after the limit retries it
            continue
        log.warning("removed %s: written to the store by a process that died before publishing it", key)
        swept.append(key)
    return swept
