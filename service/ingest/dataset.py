"""Building the ``<class>/<file>`` dataset from staged files, checking every image on the way.

Decides the layout (stripping one wrapping folder), enforces the class and image counts,
decodes each image in full under a pixel cap (``models.images``), and moves the good ones into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.errors import BadImageError, ImageTooLargeError, UnsupportedImageError
from models.images import check_image, read_header
from service.ingest.errors import DatasetRejected, _refuse_member
from service.ingest.limits import IngestLimits
from service.ingest.staging import _File, _Found

_MAX_CLASS_NAME_CHARS = 100

# The extensions of models.images.IMAGE_FORMATS, the only formats Pillow may even try.
_SUPPORTED_IMAGES = "jpg, jpeg, png, bmp, gif, webp, tif, tiff"


@dataclass
class IngestResult:
    """What a successful ingest stored.

    Attributes:
        classes: class names (NFC-normalized folder names), sorted.
        counts: images per class.
        num_images: images in total.
        skipped: ``{"file": ..., "reason": ...}`` for every file left out (OS junk, files
            outside any class folder, and bad images when ``on_bad_file="skip"``).
    """

    classes: list[str]
    counts: dict[str, int]
    num_images: int
    skipped: list[dict[str, str]] = field(default_factory=list)


def _wrapping_folder(found: _Found) -> str | None:
    """The single top-level folder to strip, if the classes live one level down."""
    paths = [f.parts for f in found.files] + list(found.dirs)
    tops = {p[0] for p in paths}
    if len(tops) != 1:
        return None
    nested = any(len(f.parts) >= 3 for f in found.files) or any(len(d) >= 2 for d in found.dirs)
    return next(iter(tops)) if nested else None


def _build_dataset(
    found: _Found, work: Path, limits: IngestLimits, on_bad_file: Literal["reject", "skip"]
) -> IngestResult:
    skipped = list(found.skipped)
    strip = 1 if _wrapping_folder(found) else 0

    classes: dict[str, list[tuple[str, _File]]] = {}
    too_deep: list[str] = []
    for d in sorted(found.dirs):
        rel = d[strip:]
        if len(rel) == 1:
            classes.setdefault(rel[0], [])
        elif len(rel) > 1:
            too_deep.append("/".join(d) + "/")
    for f in found.files:
        rel = f.parts[strip:]
        if len(rel) == 1:
            skipped.append({"file": f.display, "reason": "not inside a class folder"})
        elif len(rel) == 2:
            classes.setdefault(rel[0], []).append((rel[1], f))
        else:
            too_deep.append(f.display)
    if too_deep:
        shape = "<folder>/<class>/<image>" if strip else "<class>/<image>"
        raise DatasetRejected(
            f"folders are nested too deeply: expected {shape} (optionally inside one wrapping folder), "
            f"found {_listing(too_deep)}",
            problems=[{"file": p, "reason": f"nested deeper than {shape}"} for p in too_deep],
        )

    long_names = [c for c in classes if len(c) > _MAX_CLASS_NAME_CHARS]
    if long_names:
        raise DatasetRejected(
            f"class folder names must be at most {_MAX_CLASS_NAME_CHARS} characters: {_listing(long_names)}",
            problems=[{"file": c + "/", "reason": "class name too long"} for c in long_names],
        )

    _check_total_pixels(classes, limits)
    bad: list[dict[str, str]] = []
    good: dict[str, list[tuple[str, _File]]] = {name: [] for name in classes}
    for name, members in classes.items():
        for file_name, f in members:
            assert f.staged is not None
            reason = _image_problem(f.staged, limits.max_image_pixels)
            if reason is None:
                good[name].append((file_name, f))
            else:
                bad.append({"file": f.display, "reason": reason})
    if bad and on_bad_file == "reject":
        details = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DatasetRejected(
            f"{len(bad)} file(s) in class folders are not usable images (supported: {_SUPPORTED_IMAGES}): "
            f"{details}{more}. Remove them, or choose to skip bad files",
            problems=bad,
        )
    skipped.extend(bad)

    if len(good) < limits.min_classes:
        found_names = f": {', '.join(sorted(good))}" if good else " (expected <class>/<image> folders)"
        raise DatasetRejected(
            f"need at least {limits.min_classes} classes, found {len(good)}{found_names}",
            problems=[{"file": c + "/", "reason": "the only class"} for c in sorted(good)],
        )
    small = {c: len(v) for c, v in sorted(good.items()) if len(v) < limits.min_images_per_class}
    if small:
        listing = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise DatasetRejected(
            f"every class needs at least {limits.min_images_per_class} images; too few in: {listing}",
            problems=[{"file": c + "/", "reason": f"{n} usable image(s)"} for c, n in small.items()],
        )

    root = work.resolve()
    for name, members in good.items():
        class_dir = work / name
        class_dir.mkdir()
        for file_name, f in members:
            target = class_dir / file_name
            # Names were validated component by component; this is the belt to those braces.
            if target.resolve().parent != class_dir.resolve() or not target.resolve().is_relative_to(root):
                raise _refuse_member(f.display, "resolves outside the dataset folder")
            if target.exists():
                raise _refuse_member(f.display, "appears more than once in the archive")
            assert f.staged is not None
            os.rename(f.staged, target)

    counts = {name: len(good[name]) for name in sorted(good)}
    return IngestResult(classes=sorted(good), counts=counts, num_images=sum(counts.values()), skipped=skipped)


def _listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_total_pixels(classes: dict[str, list[tuple[str, _File]]], limits: IngestLimits) -> None:
    """Refuse the dataset when its images hold more than ``limits.max_total_pixels``, before decoding any.

    Pixels come from the headers alone; an image whose header does not read, or that breaks the
    per-image cap, is not counted (it will never be decoded; the per-image check reports it).
    """
    total = 0
    for members in classes.values():
        for _name, f in members:
            assert f.staged is not None
            pixels = _header_pixels(f.staged)
            if pixels <= limits.max_image_pixels:
                total += pixels
    if total > limits.max_total_pixels:
        raise DatasetRejected(
            f"the dataset's images hold {total:,} pixels in all (width x height, from their headers); "
            f"the limit is {limits.max_total_pixels:,} pixels per dataset. Upload smaller images or fewer of them",
            status=413,
        )


def _header_pixels(path: Path) -> int:
    """Width x height from an image's header (nothing is decoded); 0 when it does not read as one
    (the per-image check that follows names it)."""
    try:
        header = read_header(path, path.name)
    except (BadImageError, ImageTooLargeError, UnsupportedImageError):
        return 0
    return header.width * header.height


def _image_problem(path: Path, max_pixels: int) -> str | None:
    """Why a staged file is not a usable image, or None when it is.

    ``models.images.check_image``, the decoder prediction and training use too: allow-listed formats
    only, the pixel count checked from the header before any decoding, then ``verify`` (bad
    checksums) and a full decode (truncation).
    """
    try:
        check_image(path, path.name, max_pixels)
    except ImageTooLargeError as exc:
        if exc.size is None:
            return f"image too large: {exc.reason}"
        width, height = exc.size
        return (
            f"image too large: {width}x{height} = {width * height} pixels "
            f"(limit {exc.limit}; possible decompression bomb)"
        )
    except UnsupportedImageError:
        return "not an image (cannot identify image file)"
    except BadImageError as exc:
        return f"corrupt image ({exc.reason})"
    return None
