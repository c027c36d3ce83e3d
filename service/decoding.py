"""A predict request's uploads, turned into model-size arrays within fixed memory.

Decoding is where memory goes: Pillow holds 4 bytes a pixel of every decoded RGB image, and a flat
6300x6300 PNG is 130 KB on the wire and 160 MB decoded, so byte caps bound nothing. Hence:

1. ``check_headers``: every image's header is read (nothing decoded) and the request refused at
   once if one is not an allowed image or is over the per-image pixel cap (400, all named), or if
   their pixels add up to more than the request's budget (413);
2. ``decode_arrays``: each image is then decoded (drafted small where it is a JPEG), resized and
   cropped to the model's input and released before the next, under one of a process-wide number
   of decoding slots, so decoding holds at most ``slots`` full-size images whatever the number of
   requests or of images in them.

The slots are a ``threading`` semaphore taken by the threadpool thread that decodes; a request
waiting for one holds its thread meanwhile (as it held it while decoding before).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache

import numpy as np

from models.errors import BadImageError
from models.images import decode_array, read_header
from service.errors import BadRequest, TooLarge, Unavailable


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on the decoding of one predict request.

    Attributes:
        max_image_pixels: most pixels (width x height) of any one image.
        max_request_pixels: most pixels of the request's images together.
        slots: most images decoding at once in this process, across requests.
        slot_wait_s: how long an image may wait for a slot; then the request answers 503 (a
            waiting request holds a threadpool thread, which must not be held without end).
    """

    max_image_pixels: int
    max_request_pixels: int
    slots: int
    slot_wait_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_request_pixels", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeLimits.{name} must be at least 1, got {getattr(self, name)}")


@cache
def decode_slots(n: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore of ``n`` decoding slots (the same one for every caller asking for ``n``)."""
    return threading.BoundedSemaphore(n)


def _refuse(bad: list[str]) -> BadRequest:
    return BadRequest("cannot decode image(s): " + "; ".join(bad), files=bad)


def check_headers(blobs: list[tuple[str, bytes]], limits: DecodeLimits) -> None:
    """Refuse a request from its images' headers alone, before anything is decoded.

    Args:
        blobs: ``(name, file bytes)`` per image.
        limits: the caps to check.

    Raises:
        BadRequest: images that are not of an allowed format, do not parse, or have more than
            ``max_image_pixels`` pixels (every one named).
        TooLarge: the images have more than ``max_request_pixels`` pixels in all.
    """
    bad: list[str] = []
    total = 0
    for name, data in blobs:
        try:
            total += read_header(data, name, limits.max_image_pixels).pixels
        except BadImageError as exc:
            bad.append(f"{name}: {exc.reason}")
    if bad:
        raise _refuse(bad)
    if total > limits.max_request_pixels:
        raise TooLarge(
            f"the {len(blobs)} image(s) have {total} pixels in all (width x height, from their headers); "
            f"the limit per request is {limits.max_request_pixels} pixels: send fewer or smaller images",
            pixels=total,
            limit=limits.max_request_pixels,
        )


def decode_arrays(blobs: list[tuple[str, bytes]], side: int, interpolation: str, limits: DecodeLimits) -> np.ndarray:
    """Decode, resize and center-crop every image, one at a time, each under a decoding slot.

    Args:
        blobs: ``(name, file bytes)`` per image, already through ``check_headers``.
        side: output side in pixels (``Predictor.input_side``).
        interpolation: resize filter name.
        limits: the per-image cap (checked again from the header) and the number of slots.

    Returns:
        ``uint8 [N, side, side, 3]``.

    Raises:
        BadRequest: images that do not decode (every one named).
    """
    out = np.empty((len(blobs), side, side, 3), dtype=np.uint8)
    slots = decode_slots(limits.slots)
    bad: list[str] = []
    for i, (name, data) in enumerate(blobs):
        try:
            if not slots.acquire(timeout=limits.slot_wait_s):
                raise Unavailable(
                    f"the server is busy decoding other images (waited {limits.slot_wait_s:g} s for one of "
                    f"{limits.slots} decoding slots); retry the request"
                )
            try:
                out[i] = decode_array(data, name, side, interpolation, limits.max_image_pixels)
            finally:
                slots.release()
        except BadImageError as exc:
            bad.append(f"{name}: {exc.reason}")
    if bad:
        raise _refuse(bad)
    return out
