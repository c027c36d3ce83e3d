"""Domain errors of the ML engine.

The HTTP layer maps these onto status codes and the worker onto job states; nothing
below ``service/`` raises ``HTTPException``.
"""

from __future__ import annotations

import errno


class ZooError(Exception):
    """Base class of every error the engine raises on purpose."""


class WeightsUnavailableError(ZooError):
    """The requested pretrained weights cannot be obtained on this machine."""


class BadImageError(ZooError):
    """An image that does not decode.

    Attributes:
        name: the image's name as the user knows it (file name or upload name).
        reason: what the decoder said.
    """

    def __init__(self, name: str, reason: str = "") -> None:
        self.name = name
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"image {name!r} could not be decoded{detail}")


class TrainingCancelled(ZooError):
    """Training stopped because the caller asked it to (``should_stop`` returned True)."""


class TrainingError(ZooError):
    """The data cannot be trained on as given (e.g. a class with too few images to split)."""


class DiskFullError(ZooError):
    """A checkpoint or model could not be written: the disk (or the quota) is full."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, says the disk or the quota is full.

    Besides ``OSError`` this recognises safetensors' ``SafetensorError``, which carries the
    operating system's error only in its message ("... No space left on device (os error 28)").
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL:
            return True
        if type(cur).__name__ == "SafetensorError" and any(f"(os error {n})" in str(cur) for n in _DISK_FULL):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class UnsupportedImageError(BadImageError):
    """Data that is not an image of an allowed format (``models.images.IMAGE_FORMATS``)."""


class ImageTooLargeError(BadImageError):
    """An image with more pixels than allowed, refused from its header before any decoding.

    Attributes:
        size: ``(width, height)`` from the header, or None where Pillow refused before telling it.
        limit: the most pixels allowed, where known.
    """

    def __init__(
        self, name: str, reason: str, size: tuple[int, int] | None = None, limit: int | None = None
    ) -> None:
        super().__init__(name, reason)
        self.size = size
        self.limit = limit
