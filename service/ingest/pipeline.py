"""The ingest entry point, :func:`ingest_archive`: detect, stage, build, then move into place atomically.

All work happens in a temporary folder beside the destination, which is removed on any failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Literal

from service.ingest.archives import detect_format
from service.ingest.dataset import IngestResult, _build_dataset
from service.ingest.limits import IngestLimits, _Budget
from service.ingest.staging import _extract

_INCOMING = ".incoming"  # staging folder inside the temp dir; dot names are never classes


def ingest_archive(
    src: Path,
    filename: str,
    dest: Path,
    limits: IngestLimits = IngestLimits(),
    *,
    on_bad_file: Literal["reject", "skip"] = "reject",
) -> IngestResult:
    """Extract and validate an uploaded dataset archive into ``dest/<class>/<file>``.

    The archive (zip, tar or tar.gz, detected by content) must hold ``<class>/<image>``
    folders, optionally inside one wrapping folder, which is stripped. Work happens in a
    temporary folder next to ``dest``; only a fully valid dataset is renamed to ``dest``.
    On any failure, expected or not, neither the temporary folder nor ``dest`` remains.

    Args:
        src: the uploaded archive on disk.
        filename: the client's name for it, used in messages only.
        dest: where the dataset goes; must not exist yet (its parent is created if needed).
        limits: size, bomb and content caps.
        on_bad_file: what to do with a file in a class folder that is not a decodable
            image of a supported type: ``"reject"`` refuses the upload listing every such
            file, ``"skip"`` leaves them out and lists them in ``IngestResult.skipped``.

    Returns:
        The classes, per-class counts and skipped files of the stored dataset.

    Raises:
        DatasetRejected: the upload cannot become a dataset (see the package docstring for
            the status codes); ``problems`` names every offending member.
        FileExistsError: ``dest`` already exists (a caller bug, not the upload's fault).
        ValueError: ``on_bad_file`` is neither ``"reject"`` nor ``"skip"``.
    """
    if on_bad_file not in ("reject", "skip"):
        raise ValueError(f"on_bad_file must be 'reject' or 'skip', got {on_bad_file!r}")
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"dataset folder {dest} already exists")
    fmt = detect_format(src, filename)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as dest, so the final rename is atomic and never crosses file systems.
    work = dest.parent / f".{dest.name}.ingest-{secrets.token_hex(6)}"
    work.mkdir()
    try:
        incoming = work / _INCOMING
        incoming.mkdir()
        budget = _Budget(limits, archive_bytes=src.stat().st_size)
        found = _extract(src, fmt, filename, incoming, limits, budget)
        result = _build_dataset(found, work, limits, on_bad_file)
        shutil.rmtree(incoming)
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(f"dataset folder {dest} already exists")
        os.rename(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result
