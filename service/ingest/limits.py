"""The caps an upload must stay within (:class:`IngestLimits`) and the budget that enforces them.

The budget counts members and bytes as the archive is actually read, never trusting the
sizes the archive declares, and raises :class:`DatasetRejected` (413) at the first cap broken.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.units import format_bytes
from service.ingest.errors import DatasetRejected

# Tar headers and padding on top of file data, per member, when capping the whole stream.
_TAR_OVERHEAD_PER_MEMBER = 4096


@dataclass(frozen=True)
class IngestLimits:
    """Caps that keep a hostile or accidental archive from exhausting the server.

    Attributes:
        max_members: most entries (files and folders) an archive may list.
        max_total_bytes: most uncompressed bytes, counted as they are actually produced.
        max_file_bytes: most bytes of any single member.
        max_ratio: most uncompressed bytes per byte of archive (zip/gzip bomb guard).
        max_image_pixels: most pixels (width * height, read from the header before
            decoding) of any image (pixel bomb guard). PIL's own guard
            (``Image.MAX_IMAGE_PIXELS``, about 89 Mpx) is also enforced, so values above
            it have no further effect.
        max_total_pixels: most pixels of all the dataset's images together, summed from their
            headers before any is decoded (bounds the decoding work of one upload: a
            black 1-bit PNG of 40 Mpx is a few KiB on disk).
        min_classes: fewest class folders a dataset needs.
        min_images_per_class: fewest usable images each class needs.
    """

    max_members: int = 50_000
    max_total_bytes: int = 2 * 1024**3
    max_file_bytes: int = 50 * 1024**2
    max_ratio: float = 200.0
    max_image_pixels: int = 40_000_000
    max_total_pixels: int = 10_000_000_000
    min_classes: int = 2
    min_images_per_class: int = 2

    def __post_init__(self) -> None:
        for name in ("max_members", "max_total_bytes", "max_file_bytes", "max_image_pixels",
                     "max_total_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"IngestLimits.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_ratio <= 0:
            raise ValueError(f"IngestLimits.max_ratio must be positive, got {self.max_ratio}")
        if self.min_classes < 1 or self.min_images_per_class < 1:
            raise ValueError("IngestLimits.min_classes and min_images_per_class must be at least 1")


class _Budget:
    """Counts members and bytes as they are produced and stops at the first cap broken."""

    def __init__(self, limits: IngestLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = max(archive_bytes, 1)
        self.members = 0
        self.file_bytes = 0  # bytes written, plus the sizes of members read past unwritten
        self.current = ""  # member being read, for messages

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise DatasetRejected(
                f"the archive has more than {self.limits.max_members} entries (files and folders)",
                status=413,
            )

    def check_member_size(self, name: str, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise DatasetRejected(
                f"member {name!r} is larger than the {format_bytes(self.limits.max_file_bytes)} limit per file",
                status=413,
                problems=[{"file": name, "reason": f"larger than {format_bytes(self.limits.max_file_bytes)}"}],
            )

    def add_file_bytes(self, n: int) -> None:
        self.file_bytes += n
        if self.file_bytes > self.limits.max_total_bytes:
            raise DatasetRejected(
                f"the archive expands to more than {format_bytes(self.limits.max_total_bytes)} "
                f"(limit on total uncompressed size, reached at {self.current!r})",
                status=413,
            )
        self._check_ratio(self.file_bytes)

    def at_stream_offset(self, offset: int) -> None:
        cap = self.limits.max_total_bytes + _TAR_OVERHEAD_PER_MEMBER * self.limits.max_members
        if offset > cap:
            raise DatasetRejected(
                f"the archive expands to more than {format_bytes(cap)} of tar data "
                f"(limit on total uncompressed size, reached after {self.current!r})",
                status=413,
            )
        self._check_ratio(offset)

    def _check_ratio(self, expanded: int) -> None:
        if expanded > self.limits.max_ratio * self.archive_bytes:
            raise DatasetRejected(
                f"the archive expands more than {self.limits.max_ratio:g}x its compressed size of "
                f"{format_bytes(self.archive_bytes)} (possible zip bomb; limit reached at {self.current!r})",
                status=413,
            )
