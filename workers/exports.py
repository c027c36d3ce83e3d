"""What an export task does: claim the record, build the bundle (``models.bundle``), record the outcome.

Safe to run twice: only a ``queued`` export is claimed, so a redelivered message finds it running
or finished and does nothing. The bundle is checked (and, for int8, its validation accuracy change
measured) on the model's own validation split, rebuilt from its dataset with the job's seed; int8
static quantization is calibrated on the training split.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from service import unpublished
from service.config import Settings, get_settings
from service.db import DatasetRow, ExportRow, JobStatus, ModelRow, rowcount, session_scope, utcnow
from service.exports import bundle_key
from service.models_store import model_files
from service.storage import KeyMissing, store_for
from service.storage.mirror import mirror_for

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("zoofit.worker")


def _claim(export_id: str, settings: Settings) -> bool:
    with session_scope(settings) as s:
        claimed = s.execute(
            update(ExportRow).where(ExportRow.id == export_id, ExportRow.status == JobStatus.QUEUED)
            .values(status=JobStatus.RUNNING, started_at=utcnow())
        )
        return rowcount(claimed) == 1


def _finish(export_id: str, settings: Settings, **values: Any) -> bool:
    """Record the outcome of a running export; a stored bundle (``store_key``) is published with it."""
    with session_scope(settings) as s:
        done = s.execute(
            update(ExportRow).where(ExportRow.id == export_id, ExportRow.status == JobStatus.RUNNING)
            .values(finished_at=utcnow(), **values)
        )
        if rowcount(done) != 1:
            return False
        if values.get("store_key"):
            unpublished.publish(s, values["store_key"])
        return True


def _splits(
    dataset: DatasetRow | None, manifest: dict[str, Any], settings: Settings
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Validation images and labels, and training images, as the job split them (None: dataset gone)."""
    if dataset is None:
        return None
    from models.data import load_folder, stratified_split

    try:
        images = mirror_for(settings).tree(dataset.store_key)
    except KeyMissing:
        return None
    pre, spec = manifest["preprocess"], manifest.get("spec") or {}
    data = load_folder(
        images, list(manifest["classes"]), int(pre["image_size"]), str(pre["interpolation"]),
        settings.cache_dir, cache_tag=dataset.id, cache_max_bytes=settings.decoded_cache_max_bytes,
    )
    train_idx, val_idx = stratified_split(data.labels, float(spec.get("val_fraction", 0.2)), int(spec.get("seed", 0)))
    return data.images[val_idx], data.labels[val_idx], data.images[train_idx]


def _drop(settings: Settings, key: str | None) -> None:
    """Remove what a failed export may have stored (its reservation, if it made one, goes with it)."""
    if key is not None:
        unpublished.remove(settings, key)  # with the store away, the sweep removes it later


def run_export(export_id: str, *, settings: Settings | None = None) -> str | None:
    """Build the export with this id; its final status, or None when it was not queued (nothing done)."""
    from models.bundle import build_bundle
    from models.errors import ZooError
    from models.manifest import read_manifest
    from models.runtime import available_cpus, torch_threads

    settings = settings or get_settings()
    if not _claim(export_id, settings):
        return None
    with session_scope(settings) as s:
        row = s.get(ExportRow, export_id)
        assert row is not None
        model = s.get(ModelRow, row.model_id)
        dataset = s.get(DatasetRow, model.dataset_id) if model is not None else None
        fmt, quantization = row.format, row.quantization
        model_key = model.store_key if model is not None else None
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    dest = settings.tmp_dir / f"export-{export_id}.zip"  # built here, then stored under bundle_key
    key = bundle_key(model_key, export_id, secrets.token_hex(4)) if model_key is not None else None
    try:
        if model_key is None or key is None:
            raise ZooError("the model no longer exists")
        try:
            model_path = model_files(settings)(model_key)
        except KeyMissing:
            raise ZooError("the model no longer exists") from None
        manifest = read_manifest(model_path)
        splits = _splits(dataset, manifest, settings) if fmt != "safetensors" else None
        if quantization != "none" and splits is None:
            raise ZooError("int8 needs the model's dataset (calibration and the accuracy check); it was deleted")
        val_x, val_y, train_x = splits if splits is not None else (None, None, None)
        with torch_threads(settings.torch_threads or available_cpus()):
            record = build_bundle(model_path, dest, fmt=fmt, quantization=quantization, val_images=val_x,
                                  val_labels=val_y, calibration=train_x, threads=settings.torch_threads)
        unpublished.reserve(settings, key)
        store_for(settings).put_file(key, dest)
    except (ZooError, ValueError) as exc:
        _drop(settings, key)
        log.warning("export %s failed: %s", export_id, exc)
        _finish(export_id, settings, status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}",
                details=getattr(exc, "details", {}))
        return JobStatus.FAILED
    except Exception as exc:
        _drop(settings, key)
        log.exception("export %s crashed", export_id)
        _finish(export_id, settings, status=JobStatus.FAILED, error=f"internal error ({type(exc).__name__}); "
                "the worker log has the cause")
        return JobStatus.FAILED
    finally:
        dest.unlink(missing_ok=True)
    if not _finish(export_id, settings, status=JobStatus.SUCCEEDED, store_key=key, size_bytes=record["size_bytes"],
                   details=record):
        unpublished.discard(settings, key)  # the model (and its export record) was deleted meanwhile
        return None
    log.info("export %s succeeded: %s %s, %d bytes", export_id, fmt, quantization, record["size_bytes"])
    return JobStatus.SUCCEEDED
