"""Export records: asking for a model's bundle, listing them, serving the file.

A request for a format and quantization the model already has an export of returns that record
(queued, running or succeeded); a failed one is queued again. A new record is committed first and
then its id is sent to the queue, where a worker builds the bundle (``workers.exports``) and stores
it as ``<model key>/exports/<export id>-<build>.zip``, so deleting the model deletes its bundles with it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import ExportRow, JobStatus, commit, utcnow
from service.errors import Conflict, NotFound
from service.models_store import EXPORTS_DIR, get_model
from service.storage import KeyMissing, ObjectInfo, join, store_for

EnqueueExport = Callable[[str], None]
# A bundle builds in minutes: an export still queued or running after this long lost its message or
# its worker (killed mid-build), and asking for it again queues it again.
EXPORT_STALE_S = 3600.0


def bundle_key(model_key: str, export_id: str, attempt: str) -> str:
    """The store key of one build of the export's zip.

    Each build (``attempt``: a token of the worker's run) has its own: a stale build sent again
    beside one still running never overwrites, nor removes, the bundle the other published.
    """
    return join(model_key, EXPORTS_DIR, f"{export_id}-{attempt}.zip")


def request_export(
    session: Session, model_id: str, tenant: str, fmt: str, quantization: str, enqueue: EnqueueExport
) -> tuple[ExportRow, bool]:
    """The model's export in ``fmt`` + ``quantization``: the existing record, or a new one sent to a worker.

    Returns:
        The record, and whether it was (re)queued by this call.

    Raises:
        NotFound: no such model for this tenant.
    """
    get_model(session, model_id, tenant)
    row = _find(session, model_id, fmt, quantization)
    if row is not None and not _retry(row):
        return row, False
    if row is not None:  # failed or stuck before: try again
        row.status, row.error, row.details, row.finished_at, row.started_at = JobStatus.QUEUED, None, {}, None, None
    else:
        row = ExportRow(tenant=tenant, model_id=model_id, format=fmt, quantization=quantization,
                        status=JobStatus.QUEUED, details={})
        session.add(row)
    try:
        commit(session)
    except Exception as exc:
        # Two requests at once: the unique (model, format, quantization) lets one insert; the other reads it.
        if not isinstance(exc.__cause__, IntegrityError):
            raise
        existing = _find(session, model_id, fmt, quantization)
        if existing is None:
            raise
        return existing, False
    enqueue(row.id)
    return row, True


def _retry(row: ExportRow) -> bool:
    if row.status == JobStatus.FAILED:
        return True
    if row.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return False
    since = row.started_at or row.created_at
    since = since if since.tzinfo is not None else since.replace(tzinfo=UTC)  # SQLite keeps no zone
    return (utcnow() - since).total_seconds() > EXPORT_STALE_S


def _find(session: Session, model_id: str, fmt: str, quantization: str) -> ExportRow | None:
    return session.scalars(
        select(ExportRow).where(
            ExportRow.model_id == model_id, ExportRow.format == fmt, ExportRow.quantization == quantization
        )
    ).first()


def list_exports(session: Session, model_id: str, tenant: str) -> list[ExportRow]:
    get_model(session, model_id, tenant)
    query = select(ExportRow).where(ExportRow.model_id == model_id).order_by(ExportRow.created_at.desc())
    return list(session.scalars(query).all())


def get_export(session: Session, model_id: str, export_id: str, tenant: str) -> ExportRow:
    row = session.get(ExportRow, export_id)
    if row is None or row.tenant != tenant or row.model_id != model_id:
        raise NotFound(f"export {export_id!r} of model {model_id!r} not found")
    return row


def export_file(settings: Settings, row: ExportRow) -> tuple[ObjectInfo, Path | None]:
    """The bundle of a finished export: its object, and its local file when the store is a local folder.

    Raises:
        Conflict: the export has not succeeded (yet).
        NotFound: its file is gone.
    """
    if row.status != JobStatus.SUCCEEDED or not row.store_key:
        detail = f": {row.error}" if row.error else ""
        raise Conflict(f"export {row.id!r} is {row.status}{detail}; only a succeeded export can be downloaded")
    store = store_for(settings)
    try:
        info = store.info(row.store_key)
    except KeyMissing:
        raise NotFound(f"the bundle of export {row.id!r} is gone") from None
    return info, store.local_path(row.store_key)


def download_name(row: ExportRow) -> str:
    q = "" if row.quantization == "none" else f"-{row.quantization}"
    return f"zoofit-{row.model_id}-{row.format}{q}.zip"


def export_public(row: ExportRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "model_id": row.model_id,
        "format": row.format,
        "quantization": row.quantization,
        "status": row.status,
        "error": row.error,
        "size_bytes": row.size_bytes,
        "details": row.details or {},
        "download": f"/v1/models/{row.model_id}/exports/{row.id}/download" if row.status == JobStatus.SUCCEEDED
        else None,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
    }
