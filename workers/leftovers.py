"""What a worker leaves on disk when it is killed, and the sweep at its next start.

A worker writes two kinds of scratch in its host's scratch dir while it trains: the frozen-prefix
feature cache's spill folders and the temporary folder a model is written into before it is
stored. Both are removed when the attempt ends normally; a SIGKILL or an OOM kill
leaves them. Each worker's scratch carries its node name, so the worker that starts again under
that name removes exactly its own leftovers (another live worker's are not touched).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from service.config import Settings

log = logging.getLogger("zoofit.worker")


def owner_tag(worker: str) -> str:
    """The worker's node name as a file-name component (``celery@host`` -> ``celery_host``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", worker)[:100] or "worker"


def feature_spill_dir(settings: Settings, worker: str) -> Path:
    """Where this worker's feature caches spill to disk."""
    return settings.cache_dir / "features" / owner_tag(worker)


def sweep_leftovers(settings: Settings, worker: str) -> list[Path]:
    """Remove what a previous run of ``worker`` left: its spill folder and its unfinished model folders."""
    tag = owner_tag(worker)
    gone = []
    spill = feature_spill_dir(settings, worker)
    if spill.exists():
        shutil.rmtree(spill, ignore_errors=True)
        gone.append(spill)
    if settings.tmp_dir.is_dir():
        # ``workers.jobs`` writes a model as ``tmp/model-<tag>-<model id>`` before it is stored;
        # ``models.artifact.save_artifact`` writes that through ``.model-<tag>-<id>.<tag>.<random>.tmp``.
        for path in [*settings.tmp_dir.glob(f"model-{tag}-*"), *settings.tmp_dir.glob(f".model-{tag}-*")]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    if settings.storage_url is None and settings.models_dir.is_dir():
        # Releases that wrote models straight into the data dir: ``.<model id>.<tag>.<random>.tmp``.
        for path in settings.models_dir.glob(f".*.{tag}.*"):
            if path.suffix in (".tmp", ".old") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    if gone:
        log.warning("worker %s: removed what its previous run left: %s", worker, ", ".join(str(p) for p in gone))
    return gone
