"""Reading every archive member once and staging its regular files under counter names.

No archive-controlled name touches the file system here: files are written as
``<incoming>/<index>`` and recorded with their validated name parts, to be laid out later.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from service.ingest.archives import (
    _CHUNK,
    _CORRUPT_ARCHIVE_ERRORS,
    ArchiveFormat,
    _Entry,
    _tar_entries,
    _zip_entries,
)
from service.ingest.errors import DatasetRejected, _refuse_member
from service.ingest.limits import IngestLimits, _Budget
from service.ingest.names import _junk_reason, _member_parts

_T = TypeVar("_T")


@dataclass
class _File:
    parts: tuple[str, ...]
    staged: Path | None  # None when it was too deep to be worth extracting

    @property
    def display(self) -> str:
        return "/".join(self.parts)


@dataclass
class _Found:
    files: list[_File] = field(default_factory=list)
    dirs: set[tuple[str, ...]] = field(default_factory=set)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _extract(
    src: Path, fmt: ArchiveFormat, filename: str, incoming: Path, limits: IngestLimits, budget: _Budget
) -> _Found:
    """Read every member once, in archive order, staging regular files under counter names."""
    found = _Found()
    seen: dict[tuple[str, ...], bool] = {}  # parts -> is_dir
    entries = _zip_entries(src, budget) if fmt == "zip" else _tar_entries(src, fmt, budget)
    try:
        with contextlib.closing(entries):
            for index, entry in enumerate(entries):
                budget.current = entry.name
                budget.add_member()
                parts = _member_parts(entry.name)
                if not parts:
                    if entry.is_dir:
                        continue  # the archive's own root, e.g. "./"
                    raise _refuse_member(entry.name, "has an empty file name")
                display = "/".join(parts)
                if not entry.is_dir:
                    budget.check_member_size(display, entry.size)
                junk = _junk_reason(parts)
                if junk:
                    if not entry.is_dir:
                        found.skipped.append({"file": display, "reason": junk})
                        budget.add_file_bytes(entry.size)
                    continue
                if parts in seen and not (entry.is_dir and seen[parts]):
                    raise _refuse_member(display, "appears more than once in the archive")
                seen[parts] = entry.is_dir
                if entry.is_dir:
                    found.dirs.add(parts)
                elif len(parts) == 1:
                    found.skipped.append({"file": display, "reason": "not inside a class folder"})
                    budget.add_file_bytes(entry.size)
                elif len(parts) > 3:  # too deep even below a wrapping folder: don't bother reading
                    found.files.append(_File(parts, None))
                    budget.add_file_bytes(entry.size)
                else:
                    staged = incoming / str(index)
                    _copy_member(entry, display, staged, limits, budget)
                    found.files.append(_File(parts, staged))
    except _CORRUPT_ARCHIVE_ERRORS as exc:
        where = f" at member {budget.current!r}" if budget.current else ""
        raise DatasetRejected(
            f"{filename!r} is a corrupt or unreadable {fmt} archive{where}: {exc}", status=400
        ) from None
    return found


def _copy_member(entry: _Entry, display: str, staged: Path, limits: IngestLimits, budget: _Budget) -> None:
    """Copy one member, trusting neither its declared size nor the per-file cap to hold."""
    assert entry.open is not None
    allowed = min(entry.size, limits.max_file_bytes)
    written = 0
    source = _read_side(entry.open, display)
    if source is None:  # tarfile's answer for members without data; regular files always have some
        raise _refuse_member(display, "has no readable data", 400)
    with source as data, staged.open("xb") as out:
        while chunk := _read_side(functools.partial(data.read, _CHUNK), display):
            written += len(chunk)
            if written > allowed:
                if written > limits.max_file_bytes:
                    budget.check_member_size(display, written)
                raise DatasetRejected(
                    f"member {display!r} holds more data than its header declares ({entry.size} bytes)",
                    status=400,
                    problems=[{"file": display, "reason": "more data than declared"}],
                )
            budget.add_file_bytes(len(chunk))
            out.write(chunk)


def _read_side(call: Callable[[], _T], display: str) -> _T:
    """Run a read from the archive; an OSError there is damage, not a server fault.

    A zip member whose local header offset lies before the start of the file (found by
    fuzzing) makes zipfile seek to a negative position: ``OSError: [Errno 22]``. Writes to
    our own disk stay outside this wrapper, so a full disk is still a server error.
    """
    try:
        return call()
    except OSError as exc:
        raise DatasetRejected(
            f"refusing the archive: member {display!r} cannot be read, the archive is corrupt ({exc})",
            status=400,
            problems=[{"file": display, "reason": "unreadable (corrupt archive)"}],
        ) from None
