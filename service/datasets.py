"""Dataset records: turn an uploaded archive into a stored dataset, list, delete."""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import idempotency
from service.admission import lock_tenant
from service.config import Settings
from service.db import DatasetRow, JobRow, JobStatus, commit, new_id, page
from service.errors import Conflict, NotFound, ServiceError, TooLarge
from service.ingest import DatasetRejected, IngestLimits, ingest_archive
from service.quotas import check_class_count

CHUNK = 1024 * 1024


def save_upload(src: BinaryIO, dest: Path, max_bytes: int) -> str:
    """Copy an upload stream to ``dest`` in chunks, refusing more than ``max_bytes``. Returns its SHA-256."""
    written = 0
    digest = hashlib.sha256()
    try:
        with dest.open("wb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise TooLarge(f"upload exceeds the {max_bytes} byte limit (ZOOFIT_UPLOAD_MAX_BYTES)")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def sweep_stale_uploads(settings: Settings, max_age_s: float = 3600.0) -> list[Path]:
    """Remove what a killed API process left mid-upload (``tmp/upload-*``, ``datasets/.<id>.ingest-*``).

    Only entries older than ``max_age_s`` go: several API processes may share the data folder,
    and a younger entry may be an upload in progress elsewhere.
    """
    cutoff = time.time() - max_age_s
    removed = []
    candidates = [*settings.tmp_dir.glob("upload-*"), *settings.datasets_dir.glob(".*.ingest-*")]
    for path in candidates:
        try:
            if path.lstat().st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def ingest_limits(settings: Settings) -> IngestLimits:
    return IngestLimits(
        max_members=settings.extract_max_files,
        max_total_bytes=settings.extract_max_bytes,
        max_ratio=settings.extract_max_ratio,
        max_image_pixels=settings.max_image_pixels,
        max_total_pixels=settings.max_dataset_pixels,
    )


def create_dataset(
    session: Session,
    settings: Settings,
    tenant: str,
    src: BinaryIO,
    filename: str,
    name: str | None,
    on_bad_file: Literal["reject", "skip"] = "reject",
    idempotency_key: str | None = None,
) -> DatasetRow:
    """Store an uploaded archive as a dataset. Nothing remains on disk if it is rejected."""
    settings.ensure_dirs()
    dataset_id = new_id()
    upload = settings.tmp_dir / f"upload-{uuid.uuid4().hex}"
    dest = settings.datasets_dir / dataset_id
    try:
        sha = save_upload(src, upload, settings.upload_max_bytes)
        fingerprint = hashlib.sha256(f"{sha}|{name}|{on_bad_file}".encode()).hexdigest()
        ttl = settings.idempotency_ttl_s
        earlier = idempotency.lookup(session, tenant, "datasets", idempotency_key, fingerprint, ttl)
        if earlier is not None:
            return get_dataset(session, earlier, tenant)
        try:
            result = ingest_archive(upload, filename, dest, ingest_limits(settings), on_bad_file=on_bad_file)
        except DatasetRejected as exc:
            raise ServiceError(str(exc), problems=exc.problems).with_status(exc.status) from None
        check_class_count(settings, len(result.classes), "the dataset")
        row = DatasetRow(
            id=dataset_id,
            tenant=tenant,
            name=name or _name_from(filename) or dataset_id,
            classes=result.classes,
            counts=result.counts,
            num_images=result.num_images,
            skipped=result.skipped,
            path=str(dest.resolve()),
        )
        session.add(row)
        idempotency.record(session, tenant, "datasets", idempotency_key, fingerprint, dataset_id, ttl)
        # Committed here, inside the try: if the commit fails, the stored files go with it.
        earlier = idempotency.commit_first(session, tenant, "datasets", idempotency_key, fingerprint, ttl)
        if earlier is not None:  # the same key, at the same moment: that upload is the answer
            shutil.rmtree(dest, ignore_errors=True)
            return get_dataset(session, earlier, tenant)
        return row
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        upload.unlink(missing_ok=True)


def _name_from(filename: str) -> str:
    """A default dataset name from the upload's file name, storable in any database (``name`` is 255 chars)."""
    return Path(filename.replace("\x00", "")).name.split(".")[0][:255]


def get_dataset(session: Session, dataset_id: str, tenant: str) -> DatasetRow:
    row = session.get(DatasetRow, dataset_id)
    # Another tenant's dataset answers exactly like a missing one: no existence leak.
    if row is None or row.tenant != tenant:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return row


def list_datasets(session: Session, tenant: str, offset: int, limit: int) -> tuple[list[DatasetRow], int]:
    return page(session, select(DatasetRow).where(DatasetRow.tenant == tenant), offset, limit)


def delete_dataset(session: Session, settings: Settings, dataset_id: str, tenant: str) -> None:
    row = get_dataset(session, dataset_id, tenant)
    # The tenant's submissions take this lock too: a job submitted at the same moment is either
    # seen below (409) or finds the dataset gone (404), never trains on a deleted one.
    lock_tenant(session, tenant)
    busy = session.scalars(
        select(JobRow.id).where(
            JobRow.dataset_id == dataset_id, JobRow.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
        )
    ).all()
    if busy:
        raise Conflict(f"dataset {dataset_id!r} is used by unfinished jobs: {', '.join(busy)}")
    path = Path(row.path)
    session.delete(row)
    commit(session)  # files go only once the record is gone for good
    shutil.rmtree(path, ignore_errors=True)
    for cached in settings.cache_dir.glob(f"*{dataset_id}*"):
        cached.unlink(missing_ok=True)
