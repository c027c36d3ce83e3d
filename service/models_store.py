"""Trained-model records and the in-memory cache of loaded predictors."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from models.manifest import MANIFEST_FILE, ArtifactError, parse_manifest
from models.report import Report
from service import unpublished
from service.config import Settings
from service.db import ExportRow, ModelRow, commit, page
from service.errors import NotFound
from service.metrics import MODEL_CACHE_HITS, MODEL_CACHE_MISSES
from service.storage import KeyMissing, Store, StoreUnavailable, join, store_for
from service.storage.mirror import mirror_for

log = logging.getLogger("zoofit.models")
EXPORTS_DIR = "exports"  # a model's bundles: <store key>/exports/<export id>-<build>.zip (service.exports)

if TYPE_CHECKING:
    from models.artifact import Predictor


def get_model(session: Session, model_id: str, tenant: str) -> ModelRow:
    row = session.get(ModelRow, model_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"model {model_id!r} not found")
    return row


def model_location(session: Session, model_id: str, tenant: str) -> tuple[str, int]:
    """The model's store key and class count, without loading the stored report (what predict needs)."""
    found = session.execute(
        select(ModelRow.store_key, ModelRow.classes).where(ModelRow.id == model_id, ModelRow.tenant == tenant)
    ).first()
    if found is None:
        raise NotFound(f"model {model_id!r} not found")
    return str(found.store_key), len(found.classes)


# What a loaded model needs of its stored tree: not its bundles, its figures (``models.plots.FIGURES_DIR``)
# or the ONNX graph an API process made (``models.onnx_runtime.RUNTIME_DIR``; not imported: they import torch).
FIGURES_DIR = "report"
NOT_LOADED = (EXPORTS_DIR, FIGURES_DIR, "runtime")


def model_files(settings: Settings) -> Callable[[str], Path]:
    """Turns a model's store key into a local folder with its files (``service.storage.mirror``)."""
    mirror = mirror_for(settings)
    return lambda key: mirror.tree(key, skip=NOT_LOADED)


def list_models(session: Session, tenant: str, offset: int, limit: int) -> tuple[list[ModelRow], int]:
    return page(session, select(ModelRow).where(ModelRow.tenant == tenant), offset, limit)


def model_public(settings: Settings, row: ModelRow, *, with_report: bool = False) -> dict[str, Any]:
    """The model as the API shows it: ``metrics`` is the report's summary, or the whole report."""
    manifest = row.manifest or {}
    return {
        "id": row.id,
        "job_id": row.job_id,
        "dataset_id": row.dataset_id,
        "classes": row.classes,
        "members": manifest.get("members", []),
        "metrics": (full_report(settings, row) or row.metrics) if with_report else row.metrics,
        "spec": manifest.get("spec", {}),
        "preprocess": manifest.get("preprocess", {}),
        "created_at": row.created_at,
    }


def stored_report(settings: Settings, row: ModelRow) -> dict[str, Any] | None:
    """The evaluation report in the model's stored manifest (its one stored copy), if it has one.

    Rows written by releases before the report was stored once also carry it in the database.
    """
    store = store_for(settings)
    key = join(row.store_key, MANIFEST_FILE)
    try:
        report = _report_in(store, key, store.info(key).version)
    except (KeyMissing, StoreUnavailable, OSError, ArtifactError):
        report = None
    return report or (row.manifest or {}).get("report")


@functools.lru_cache(maxsize=64)
def _report_in(store: Store, key: str, _version: str) -> dict[str, Any] | None:
    # A job is polled every second or so: read and parse each manifest once, not per request. The
    # object's version is in the key, so a manifest written anew is read again.
    report = parse_manifest(store.get_bytes(key), key).get("report")
    return dict(report) if report else None


def full_report(settings: Settings, row: ModelRow) -> Report | None:
    """The model's whole report, validated (a damaged one is an error, never cut down to a summary).

    Without ``val_predictions``: up to 2,000 rows that only the report route serves, not every poll
    of the job or the model.
    """
    report = stored_report(settings, row)
    return Report.model_validate({**report, "val_predictions": None}) if report else None


def model_report(settings: Settings, row: ModelRow) -> dict[str, Any]:
    """The model's evaluation report.

    Raises:
        NotFound: the model was saved before reports existed, or its folder is unreadable.
    """
    report = stored_report(settings, row)
    if not report:
        raise NotFound(f"model {row.id!r} has no evaluation report (it was saved before reports existed)")
    return dict(report)


def report_figure(settings: Settings, row: ModelRow, name: str) -> bytes:
    """PNG bytes of one report figure, rendered on first use and kept in the store beside the model.

    Every API process serves the one stored copy; two rendering it at once both write a whole PNG.
    """
    from models.plots import FIGURES, ReportMissingError, render_figure
    from models.spec import check_name

    check_name("figure", name, list(FIGURES))
    store = store_for(settings)
    key = join(row.store_key, FIGURES_DIR, f"{name}.png")
    with contextlib.suppress(KeyMissing):
        return store.get_bytes(key)
    try:
        png = render_figure(name, model_report(settings, row))
    except ReportMissingError as exc:
        raise NotFound(f"model {row.id!r}: {exc}") from exc
    try:
        store.put_bytes(key, png)
    except (OSError, StoreUnavailable) as exc:  # a read-only store: served, not kept
        log.warning("could not keep figure %s: %s", key, exc)
    return png


def delete_model(session: Session, settings: Settings, cache: PredictorCache, model_id: str, tenant: str) -> None:
    row = get_model(session, model_id, tenant)
    key = row.store_key
    session.delete(row)
    session.execute(delete(ExportRow).where(ExportRow.model_id == model_id))  # their bundles are in its tree
    unpublished.hand_over(session, key)  # should the store be away below, the sweep removes the files
    commit(session)  # files go only once the record is gone for good
    cache.evict(model_id)
    unpublished.remove(settings, key)
    mirror_for(settings).drop(key)  # this host's copy; other API hosts' age out of their scratch


class PredictorCache:
    """A bounded LRU of loaded models; each model is loaded once, even under concurrent requests.

    ``evict`` (a deleted model) wins over a load in flight: that load's result is thrown away and
    its requests answer 404, so a deleted model never comes back into the cache.
    """

    def __init__(
        self, capacity: int, device: str | None = None, *, runtime: str = "torch", threads: int | None = None,
        files: Callable[[str], Path] | None = None,
    ) -> None:
        self.capacity = capacity
        # A model's store key to a local folder of its files (``model_files``); None: keys are folders.
        self.files = files
        self.device = device
        self.runtime = runtime  # ``models.runtime.PREDICT_RUNTIMES``
        self.threads = threads  # onnxruntime intra-op threads (torch's are set on the inference thread)
        self._items: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._evictions: dict[str, int] = {}  # per model id, how often it was evicted (while loads ran)

    def get(self, model_id: str, key: str | Path) -> Predictor:
        """The loaded model, from its store key (a folder when the cache has no ``files``).

        Raises:
            NotFound: the model was deleted before or while it loaded (its files are gone).
            ArtifactError: the folder exists but is not a model this code reads.
        """
        with self._lock:
            if model_id in self._items:
                self._items.move_to_end(model_id)
                MODEL_CACHE_HITS.inc()
                return self._items[model_id]
            load_lock = self._loading.setdefault(model_id, threading.Lock())
        with load_lock:
            with self._lock:
                if model_id in self._items:
                    MODEL_CACHE_HITS.inc()  # another request loaded it meanwhile
                    return self._items[model_id]
                evictions = self._evictions.get(model_id, 0)
            MODEL_CACHE_MISSES.inc()
            try:
                predictor = self._load(model_id, key)
            except BaseException:
                with self._lock:
                    self._done_loading(model_id, load_lock)
                raise
            # One locked step: an evict either ran before it (counted) or runs after (removes it).
            with self._lock:
                self._done_loading(model_id, load_lock)
                if self._evictions.get(model_id, 0) != evictions:
                    raise NotFound(f"model {model_id!r} not found (it was deleted)")
                self._items[model_id] = predictor
                self._items.move_to_end(model_id)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            return predictor

    def _done_loading(self, model_id: str, load_lock: threading.Lock) -> None:
        # Under self._lock. Only the lock this load registered (a later load may have its own).
        if self._loading.get(model_id) is load_lock:
            del self._loading[model_id]

    def _load(self, model_id: str, key: str | Path) -> Predictor:
        from models.artifact import load_predictor

        try:
            path = self.files(str(key)) if self.files is not None else Path(key)
        except KeyMissing:
            raise NotFound(f"model {model_id!r} not found (it was deleted)") from None
        try:
            return load_predictor(path, device=self.device, runtime=self.runtime, threads=self.threads)
        except ArtifactError as exc:
            if not Path(path).exists():
                raise NotFound(f"model {model_id!r} not found (it was deleted)") from exc
            raise

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._items.pop(model_id, None)
            if model_id in self._loading:
                self._evictions[model_id] = self._evictions.get(model_id, 0) + 1
            else:
                self._evictions.pop(model_id, None)

    def __len__(self) -> int:
        return len(self._items)
