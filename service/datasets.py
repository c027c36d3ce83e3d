"""Dataset records: turn an uploaded archive into a stored dataset, list, delete."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import BinaryIO, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import idempotency, unpublished
from service.admission import lock_tenant
from service.config import Settings
from service.db import DatasetRow, JobRow, JobStatus, commit, new_id, page
from service.errors import Conflict, NotFound, ServiceError, TooLarge, Unavailable
from service.ingest import DatasetRejected, IngestLimits, ingest_archive
from service.quotas import check_class_count
from service.storage import KeyMissing, ObjectInfo, join, store_for
from service.storage.mirror import mirror_for

DATASETS_PREFIX = "datasets"

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
    """Remove what a killed API process left mid-upload in this host's scratch (``tmp/upload-*``, the
    extraction folders ``tmp/ds-<id>`` and ``tmp/.ds-<id>.ingest-*``; ``datasets/.<id>.ingest-*`` of
    releases that extracted in the data dir).

    Only entries older than ``max_age_s`` go: several API processes may share the data folder,
    and a younger entry may be an upload in progress elsewhere.
    """
    cutoff = time.time() - max_age_s
    removed = []
    candidates = [
        *settings.tmp_dir.glob("upload-*"),
        *settings.tmp_dir.glob("ds-*"),
        *settings.tmp_dir.glob(".ds-*.ingest-*"),
        *settings.datasets_dir.glob(".*.ingest-*"),
    ]
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
    """Store an uploaded archive as a dataset. Nothing remains, on disk or in the store, if it is rejected.

    The archive is saved and extracted in this host's scratch, the images are published to the
    store under ``datasets/<id>``, and only then is the record committed (the publish point: a
    crash before it leaves objects no record names, and no record without its objects).
    """
    settings.ensure_dirs()
    dataset_id = new_id()
    upload = settings.tmp_dir / f"upload-{uuid.uuid4().hex}"
    dest = settings.tmp_dir / f"ds-{dataset_id}"
    key = join(DATASETS_PREFIX, dataset_id)
    store = store_for(settings)
    written = False
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
        unpublished.reserve(settings, key)  # a crash from here to the commit leaves objects a sweep removes
        written = True
        store.put_tree(key, dest)
        row = DatasetRow(
            id=dataset_id,
            tenant=tenant,
            name=name or _name_from(filename) or dataset_id,
            classes=result.classes,
            counts=result.counts,
            num_images=result.num_images,
            skipped=result.skipped,
            store_key=key,
        )
        session.add(row)
        unpublished.publish(session, key)
        idempotency.record(session, tenant, "datasets", idempotency_key, fingerprint, dataset_id, ttl)
        # Committed here, inside the try: if the commit fails, the stored files go with it.
        earlier = idempotency.commit_first(session, tenant, "datasets", idempotency_key, fingerprint, ttl)
        if earlier is not None:  # the same key, at the same moment: that upload is the answer
            unpublished.discard(settings, key)
            return get_dataset(session, earlier, tenant)
        return row
    except BaseException:
        if written:
            # This session's uncommitted writes go first: they hold the lock that discard's own
            # transaction needs (SQLite has one writer), and none of them may land anyway.
            session.rollback()
            unpublished.discard(settings, key)
        raise
    finally:
        upload.unlink(missing_ok=True)
        shutil.rmtree(dest, ignore_errors=True)


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
    key = row.store_key
    session.delete(row)
    unpublished.hand_over(session, key)  # should the store be away below, the sweep removes the files
    commit(session)  # files go only once the record is gone for good
    unpublished.remove(settings, key)
    mirror_for(settings).drop(key)  # this host's copy; other hosts' age out of their scratch
    for cached in settings.cache_dir.glob(f"*{dataset_id}*"):
        cached.unlink(missing_ok=True)


# Thumbnail sides: one a browser asks for is clamped into this range.
THUMBNAIL_MIN, THUMBNAIL_MAX = 32, 256


def _stored_files(settings: Settings, row: DatasetRow) -> dict[str, list[str]]:
    """The images of each class, as training reads them: ``<class>/<file>`` directly, sorted, no hidden files.

    One listing of the dataset's tree in the store (no links: a ``LocalStore`` lists regular files only).
    """
    cut = len(row.store_key) + 1
    found: dict[str, list[str]] = {label: [] for label in row.classes}
    for obj in store_for(settings).list(row.store_key):
        parts = obj.key[cut:].split("/")
        if len(parts) == 2 and parts[0] in found and not parts[1].startswith("."):
            found[parts[0]].append(parts[1])
    return found


def sample_files(settings: Settings, row: DatasetRow, per_class: int) -> list[tuple[str, int, list[str]]]:
    """Up to ``per_class`` files of each class, spread evenly over its sorted list.

    Returns:
        ``(class, images in the class, [<class>/<file>, ...])`` per class, in class order.
    """
    stored = _stored_files(settings, row)
    out = []
    for label in row.classes:
        names = sorted(stored[label])
        step = max(1, len(names) / per_class) if names else 1
        picked = [names[int(i * step)] for i in range(min(per_class, len(names)))]
        out.append((label, len(names), [f"{label}/{n}" for n in picked]))
    return out


def stored_image(settings: Settings, row: DatasetRow, file_path: str) -> ObjectInfo:
    """The stored image ``<class>/<file>`` of the dataset; anything else is a 404.

    Only a name of exactly two components is looked up, the first one of the dataset's classes and
    neither ``.``/``..`` nor hidden; the store then must hold it as a regular object (a
    ``LocalStore`` follows no link on the way).
    """
    missing = NotFound(f"dataset {row.id!r} has no image {file_path!r}")
    parts = file_path.split("/")
    if len(parts) != 2 or "\x00" in file_path or "\\" in file_path:
        raise missing
    label, name = parts
    if label not in row.classes or not name or name.startswith(".") or label in (".", ".."):
        raise missing
    try:
        return store_for(settings).info(join(row.store_key, label, name))
    except (KeyMissing, ValueError, OSError):
        raise missing from None


class ThumbnailCache:
    """Thumbnail bytes kept in memory, at most ``max_bytes`` of them, least recently used dropped first.

    Keyed by ``(dataset id, file, side, the stored object's version)``: a file replaced under the same name
    misses; a deleted dataset's entries are never asked for again and age out.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[tuple[str, str, int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int, str]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, str, int, str], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self._items[key] = data
            self.size += len(data)
            while self.size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)


@cache
def thumbnail_cache(max_bytes: int) -> ThumbnailCache:
    """The process's thumbnail cache (one per size asked for: one per process in practice)."""
    return ThumbnailCache(max_bytes)


@cache
def thumbnail_slots(n: int) -> threading.BoundedSemaphore:
    """The process's thumbnail decoding slots: apart from predict's, so viewing datasets never starves it."""
    return threading.BoundedSemaphore(n)


def thumbnail(settings: Settings, row: DatasetRow, file_path: str, size: int) -> bytes:
    """A JPEG of one stored image, its longer side at most ``size`` (clamped to 32..256).

    Served from the process's ``thumbnail_cache`` when the same file (same mtime) was asked for at
    the same size; otherwise decoded through ``models.images.open_image`` (pixel cap, allowed
    formats, JPEG draft) under one of the process's ``thumbnail_slots``, waited for at most
    ``thumbnail_wait_s``: a console showing many thumbnails queues here, never on predict's slots.

    Raises:
        NotFound: not an image the dataset holds (``stored_image``), or it no longer decodes.
        Unavailable: every thumbnail slot stayed busy for ``thumbnail_wait_s`` (Retry-After: 1).
    """
    import io

    from models.errors import BadImageError
    from models.images import open_image

    stored = stored_image(settings, row, file_path)
    side = min(THUMBNAIL_MAX, max(THUMBNAIL_MIN, size))
    key = (row.id, file_path, side, stored.version)
    cached = thumbnail_cache(settings.thumbnail_cache_max_bytes)
    data = cached.get(key)
    if data is not None:
        return data
    slots = thumbnail_slots(settings.thumbnail_slots)
    if not slots.acquire(timeout=settings.thumbnail_wait_s):
        raise Unavailable("the server is busy making other thumbnails; retry the request", retry_after=1)
    try:
        try:
            src = store_for(settings).get_bytes(stored.key)
        except KeyMissing:
            raise NotFound(f"dataset {row.id!r} has no image {file_path!r}") from None
        img = open_image(src, file_path, max_pixels=settings.max_image_pixels, min_side=side)
        img.thumbnail((side, side))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=80)
    except BadImageError as exc:
        raise NotFound(f"dataset {row.id!r}: image {file_path!r} does not decode: {exc.reason}") from None
    finally:
        slots.release()
    data = out.getvalue()
    cached.put(key, data)
    return data
