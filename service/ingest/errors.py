"""How ingest refuses an upload: :class:`DatasetRejected`, with its HTTP status and per-file problems."""

from __future__ import annotations


class DatasetRejected(Exception):
    """An upload that cannot become a dataset.

    Attributes:
        message: what is wrong, naming the offending member(s).
        status: the HTTP status the caller should answer with: 400 when the upload is not
            a readable archive, 413 when it breaks a size or bomb cap, 422 when the archive
            is readable but its content is not an acceptable dataset.
        problems: one ``{"file": ..., "reason": ...}`` per offending member or class.
    """

    def __init__(self, message: str, *, status: int = 422, problems: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.problems: list[dict[str, str]] = list(problems or [])


def _refuse_member(name: str, reason: str, status: int = 422) -> DatasetRejected:
    return DatasetRejected(
        f"refusing the archive: member {name!r} {reason}",
        status=status,
        problems=[{"file": name, "reason": reason}],
    )
