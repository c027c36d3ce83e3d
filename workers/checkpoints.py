"""Where a job's training checkpoint lives: ``checkpoints/<job id>/`` in the artifact store.

The worker writes each checkpoint file in a local folder first (``models.checkpoint.save_state``
writes it whole and renames it), then stores it under the same name: one object, replaced
atomically, so a worker on another host that takes the job over reads the last whole checkpoint.
With the embedded ``LocalStore`` the local folder *is* the stored one and nothing is copied.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from service import unpublished
from service.config import Settings
from service.storage import KeyMissing, StoreUnavailable, join, store_for

log = logging.getLogger("zoofit.worker")

CHECKPOINTS_PREFIX = "checkpoints"


class JobCheckpoint:
    """One job's checkpoint files: a local folder on this host, mirrored to the store."""

    def __init__(self, settings: Settings, job_id: str) -> None:
        self.settings = settings
        self.store = store_for(settings)
        self.key = join(CHECKPOINTS_PREFIX, job_id)
        stored = self.store.local_path(self.key)
        self.remote = stored is None
        self.dir: Path = stored if stored is not None else settings.cache_dir / CHECKPOINTS_PREFIX / job_id

    def exists(self, name: str) -> bool:
        """Whether the store holds the file ``name`` of this checkpoint."""
        return self.store.exists(join(self.key, name))

    def pull(self, *names: str) -> None:
        """Copy the stored files ``names`` into the local folder (those the store lacks are left out)."""
        if not self.remote:
            return
        for name in names:
            try:
                self.store.get_file(join(self.key, name), self.dir / name)
            except KeyMissing:
                (self.dir / name).unlink(missing_ok=True)

    def push(self, name: str) -> None:
        """Store the local file ``name`` (written whole before this call)."""
        if self.remote:
            self.store.put_file(join(self.key, name), self.dir / name)

    def drop(self) -> None:
        """Remove the checkpoint from the store and this host.

        Called once the job's outcome is recorded: a store that is away then is no reason to fail,
        so the key goes to ``service.unpublished``, whose sweep removes it later.
        """
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.store.delete_tree(self.key)
        except StoreUnavailable as exc:
            log.warning("could not remove the checkpoint %s (%s); it is swept later", self.key, exc)
            with contextlib.suppress(Exception):
                unpublished.reserve(self.settings, self.key)
