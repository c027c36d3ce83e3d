"""Turn an uploaded dataset archive into a ``<class>/<image>`` folder, or refuse it.

The HTTP layer streams the upload to a temporary file and calls :func:`ingest_archive`.
Everything here treats the archive as hostile: members are read one by one through our
own checks (never ``extractall``), every byte written is counted, no archive-controlled
name touches the file system until it has been validated, and links or device entries
are refused rather than "fixed". Files are first written under counter names in a staging
folder; the final ``<class>/<file>`` layout is built from validated names only.

Failures raise :class:`DatasetRejected`, which carries the HTTP status the caller should
answer with (400 unreadable, 413 over a size or bomb cap, 422 unacceptable content) and a
per-file ``problems`` list. The package is deliberately free of web and ML imports.

The package, one concern a module:

- ``archives``: format detection by content, the zip and tar member readers.
- ``limits``: :class:`IngestLimits` and the budget that counts members and bytes against them.
- ``names``: member-name validation and the OS-junk rules.
- ``staging``: reading every member once, staging regular files under counter names.
- ``dataset``: the ``<class>/<file>`` layout, the per-image checks and :class:`IngestResult`.
- ``errors``: :class:`DatasetRejected`.
- ``pipeline``: :func:`ingest_archive`, tying these together in a temporary folder.
"""

from service.ingest.archives import ArchiveFormat, detect_format
from service.ingest.dataset import IngestResult
from service.ingest.errors import DatasetRejected
from service.ingest.limits import IngestLimits
from service.ingest.pipeline import ingest_archive

__all__ = [
    "ArchiveFormat",
    "DatasetRejected",
    "IngestLimits",
    "IngestResult",
    "detect_format",
    "ingest_archive",
]
