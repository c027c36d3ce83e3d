"""The artifact store (datasets, models, exports, checkpoints) and this host's local copies of it.

``store_for(settings)`` is the store ``ZOOFIT_STORAGE_URL`` names: the data dir by default
(``LocalStore``), or an S3-compatible bucket (``S3Store``, boto3). ``mirror_for(settings)`` gives
local folders for stored trees (``service.storage.mirror``): the store's own folder when it is
local, else a copy in this host's scratch dir.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlparse

from service.config import Settings
from service.storage.base import KeyMissing, ObjectInfo, Store, StoreUnavailable, check_key, join

__all__ = [
    "KeyMissing",
    "ObjectInfo",
    "Store",
    "StoreUnavailable",
    "check_key",
    "join",
    "open_store",
    "store_for",
]


def open_store(settings: Settings) -> Store:
    """A new store client for ``settings.storage_url`` (the data dir when unset).

    Raises:
        ValueError: the URL's scheme is neither ``file`` nor ``s3``, or it names no bucket.
    """
    url = settings.storage_url
    if not url:
        from service.storage.local import LocalStore

        return LocalStore(settings.data_dir)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from service.storage.local import LocalStore

        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"ZOOFIT_STORAGE_URL {url!r} names no bucket (s3://bucket/prefix)")
        from service.storage.s3 import S3Store

        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=(
                settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
            ),
            transfer_threads=settings.s3_transfer_threads,
        )
    raise ValueError(f"ZOOFIT_STORAGE_URL {url!r}: the scheme must be s3:// or file://")


_clients: dict[tuple[object, ...], Store] = {}
_clients_lock = threading.Lock()


def store_for(settings: Settings) -> Store:
    """The process's store client for these settings' store (made once; clients are thread-safe)."""
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    key = (settings.storage_url, str(settings.data_dir.resolve()), settings.s3_endpoint_url, settings.s3_region,
           settings.s3_access_key_id, secret, settings.s3_transfer_threads)
    with _clients_lock:
        store = _clients.get(key)
        if store is None:
            store = _clients[key] = open_store(settings)
        return store
