"""One image in: decoded safely, as RGB, resized and center-cropped to the model's input.

The one decoder of the project: ingest checks each uploaded image with ``check_image``, training
reads datasets with ``open_image`` + ``to_array`` and prediction decodes uploads with
``decode_array``, so a model sees at serving time exactly what it was trained on.

Every decode is bounded before it starts:

- only ``IMAGE_FORMATS`` are tried (``Image.open(formats=...)``): no EPS handed to Ghostscript, none
  of Pillow's rarer plugins;
- the pixel count from the header is checked before any pixel is decoded, against the caller's cap
  and against Pillow's own ``Image.MAX_IMAGE_PIXELS``: where Pillow only warns
  (``DecompressionBombWarning``, between once and twice that) this refuses. The check is explicit
  rather than ``warnings.catch_warnings``, which swaps the process-wide filter list and so races
  with every other thread (before Python 3.14);
- a JPEG wanted at a small size is decoded small (``Image.draft``: the decoder scales by 1/2, 1/4 or
  1/8), leaving at least ``DRAFT_GAP`` times the side asked for so the final resize keeps its quality,
  as Pillow's ``thumbnail`` does with its ``reducing_gap``;
- nothing is copied that need not be: the decoded image is the only full-size buffer of an RGB
  image; wide grayscale (16-bit, float) is scaled to 8 bits, and transparency composited on white,
  in blocks of rows.

Nothing here imports torch.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import BadImageError, ImageTooLargeError, UnsupportedImageError

# Formats Pillow may even try. (Multi-picture camera JPEGs open through the JPEG entry as "MPO".)
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
# A JPEG is drafted to no less than this many times the side it will be resized to.
DRAFT_GAP = 2
# Wide grayscale is scaled to 8 bits this many pixels at a time (float64: 8 MB a block).
_BLOCK_PIXELS = 1 << 20

RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

Source = Path | str | bytes | bytearray


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding it."""

    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _pixel_limit(max_pixels: int | None) -> int | None:
    # Pillow's own limit counts too: above it Pillow would only warn, and this refuses instead.
    limits = [m for m in (max_pixels, Image.MAX_IMAGE_PIXELS) if m is not None]
    return min(limits) if limits else None


@contextmanager
def _reading(src: Source, name: str) -> Iterator[BinaryIO]:
    """The source as a binary file; any error inside becomes a ``BadImageError`` naming ``name``.

    Pillow is given the open file, never the path, so it owns nothing: closing the file here does
    not close (and void) the decoded image, which therefore needs no copy.
    """
    try:
        with io.BytesIO(src) if isinstance(src, bytes | bytearray) else open(src, "rb") as fh:
            yield fh
    except BadImageError:
        raise
    except Exception as exc:  # the decoders raise many types (OSError, SyntaxError, ValueError, ...)
        detail = str(exc) if isinstance(src, bytes | bytearray) else str(exc).replace(str(src), "<file>")
        raise BadImageError(name, f"{type(exc).__name__}: {detail}") from exc


def _open(fh: BinaryIO, name: str, max_pixels: int | None) -> ImageFile.ImageFile:
    """The image with its header read and its size checked; no pixel decoded yet."""
    try:
        img = Image.open(fh, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(
            name, f"not a recognised image format (supported: {', '.join(IMAGE_FORMATS)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Over twice Pillow's limit (or a process that made the warning an error): refused in open.
        raise ImageTooLargeError(name, f"too many pixels ({exc})", limit=_pixel_limit(max_pixels)) from exc
    width, height = img.size
    limit = _pixel_limit(max_pixels)
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            name,
            f"too many pixels: {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "(possible decompression bomb)",
            size=(width, height),
            limit=limit,
        )
    return img


def read_header(src: Source, name: str, max_pixels: int | None = None) -> ImageHeader:
    """The size and format of an image, from its header alone.

    Args:
        src: file path or the file's bytes.
        name: what to call the image in errors (e.g. the upload's file name).
        max_pixels: most pixels allowed (``Image.MAX_IMAGE_PIXELS`` applies as well).

    Returns:
        The header's width, height and format.

    Raises:
        UnsupportedImageError: not an image of one of ``IMAGE_FORMATS``.
        ImageTooLargeError: more pixels than allowed.
        BadImageError: a header that does not parse.
    """
    with _reading(src, name) as fh:
        img = _open(fh, name, max_pixels)
        return ImageHeader(img.size[0], img.size[1], str(img.format))


def open_image(src: Source, name: str, *, max_pixels: int | None = None, min_side: int | None = None) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image.

    Args:
        src: file path or the file's bytes.
        name: what to call the image in errors (e.g. the upload's file name).
        max_pixels: most pixels allowed, checked from the header before decoding
            (``Image.MAX_IMAGE_PIXELS`` applies as well).
        min_side: the shorter side the image will be resized to, if known: a JPEG larger than
            ``DRAFT_GAP`` times that is decoded at a reduced scale (never below it).

    Returns:
        The decoded RGB image (EXIF rotation applied, transparency composited on white).

    Raises:
        UnsupportedImageError: not an image of one of ``IMAGE_FORMATS``.
        ImageTooLargeError: more pixels than allowed.
        BadImageError: the data does not decode (or is truncated).
    """
    with _reading(src, name) as fh:
        img = _open(fh, name, max_pixels)
        if min_side is not None:
            img.draft("RGB", (min_side * DRAFT_GAP, min_side * DRAFT_GAP))  # JPEG only; others ignore it
        img.load()
        return to_rgb(img)


def check_image(src: Source, name: str, max_pixels: int | None = None) -> None:
    """Raise unless ``src`` is a whole image of an allowed format within ``max_pixels``.

    The header is checked first, then ``verify`` (which catches bad checksums but not truncation),
    then the image is decoded in full.

    Raises:
        UnsupportedImageError, ImageTooLargeError, BadImageError: as ``open_image``.
    """
    with _reading(src, name) as fh:
        _open(fh, name, max_pixels).verify()
    with _reading(src, name) as fh:
        _open(fh, name, max_pixels).load()


def decode_array(
    src: Source, name: str, size: int, interpolation: str, max_pixels: int | None = None
) -> np.ndarray:
    """Decode one image straight to the model's input: ``uint8 [size, size, 3]``.

    ``open_image`` (drafted for ``size``) then ``to_array``; the decoded image is released when this
    returns, so a caller decoding images one after the other holds at most one at full size.

    Raises:
        ValueError: an unknown ``interpolation`` (before anything is decoded).
        UnsupportedImageError, ImageTooLargeError, BadImageError: as ``open_image``.
    """
    resample_filter(interpolation)
    return to_array(open_image(src, name, max_pixels=max_pixels, min_side=size), size, interpolation)


def _wide_to_l(img: Image.Image) -> Image.Image:
    # 16/32-bit integer and float grayscale: scale into 0..255 instead of letting PIL clip. Done in
    # blocks of rows: a float64 copy of the whole image would take 8 bytes a pixel.
    width, height = img.size
    rows = max(1, _BLOCK_PIXELS // max(width, 1))

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for top in range(0, height, rows):
            yield top, np.asarray(img.crop((0, top, width, min(height, top + rows))), dtype=np.float64)

    top_value = np.max([b.max() for _, b in blocks()]) if img.mode in ("F", "I") and width * height else 0.0
    out = np.empty((height, width), dtype=np.uint8)
    for top, arr in blocks():
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif img.mode == "F" and top_value <= 1.0:
            arr = arr * 255.0
        elif img.mode == "I" and top_value > 255:
            arr = arr / 257.0
        out[top : top + len(arr)] = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # uint8 [H, W]: mode L


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; the same object when it says nothing to do."""
    img.load()
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img  # exif_transpose would return a full copy


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to RGB; transparency is composited on white, EXIF rotation applied.

    Args:
        img: a decoded image of any mode (L, P, RGBA, LA, CMYK, I;16, ...).

    Returns:
        An RGB image: ``img`` itself when it is RGB and upright already (it is never modified).
    """
    img = _upright(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _wide_to_l(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        return _on_white(img)
    return img.convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    # Composited in blocks of rows, straight into the RGB result: whole-image RGBA copies (the
    # conversion, the white background, the composite) would take 4 bytes a pixel each.
    width, height = img.size
    rows = max(1, _BLOCK_PIXELS // max(width, 1))
    out = Image.new("RGB", img.size)
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        block = img.crop(box).convert("RGBA")
        white = Image.new("RGBA", block.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, block).convert("RGB"), box[:2])
    return out


def resample_filter(interpolation: str) -> Image.Resampling:
    """PIL filter for an interpolation name (``bicubic``, ``bilinear``, ...)."""
    try:
        return RESAMPLE[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(RESAMPLE)}") from None


def to_array(img: Image.Image, size: int, interpolation: str) -> np.ndarray:
    """Resize the shorter side to ``size``, center-crop ``size x size``, return ``uint8 [S, S, 3]``.

    Args:
        img: an image (converted to RGB if it is not).
        size: output side in pixels.
        interpolation: resize filter name.

    Returns:
        The HWC uint8 array.
    """
    resample = resample_filter(interpolation)
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).copy()
