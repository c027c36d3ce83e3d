"""Domain errors of the ML engine.

The HTTP layer maps these onto status codes and the worker onto job states; nothing
below ``service/`` raises ``HTTPException``.
"""

from __future__ import annotations


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
