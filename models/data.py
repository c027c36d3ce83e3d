"""Image folders in, uint8 arrays out.

Every image is decoded once (``models.images``: the decoder ingest and prediction use too),
converted to RGB, resized (shorter side) and center-cropped to the model's input size, and
stored in one ``uint8 [N, S, S, 3]`` array. Prediction goes through the same ``open_image``
and ``to_array`` so the model sees what it was trained on. A dataset's array can be cached as
``.npz`` (never pickled) so a second job on it does not decode again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TrainingError
from .images import RESAMPLE, open_image, resample_filter, to_array, to_rgb

# The single-image functions live in models.images; importing them from here still works.
__all__ = [
    "CACHE_VERSION", "RESAMPLE", "ImageArray", "check_trainable", "load_folder", "open_image", "prune_cache",
    "resample_filter",
    "stratified_split", "to_array", "to_rgb",
]

# 2: large JPEGs are decoded drafted (models.images.open_image with min_side), as prediction does.
CACHE_VERSION = 2


@dataclass
class ImageArray:
    """A decoded, labelled image set.

    Attributes:
        images: ``uint8 [N, S, S, 3]`` RGB images, already resized and center-cropped.
        labels: ``int64 [N]`` indices into ``classes``.
        classes: class names; label ``i`` is ``classes[i]``.
        names: optional per-image names (``<class>/<file>``), for reporting.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, S, S, 3], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be [N={len(self.images)}], got {self.labels.shape}")
        self.labels = self.labels.astype(np.int64, copy=False)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Images per class."""
        n = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n, strict=True)}


def _class_files(root: Path, classes: list[str]) -> list[tuple[int, Path]]:
    files: list[tuple[int, Path]] = []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            raise TrainingError(f"class folder {cls!r} does not exist under {root}")
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        files.extend((label, folder / n) for n in names)
    return files


def _cache_key(root: Path, files: list[tuple[int, Path]], classes: list[str], size: int, interp: str) -> str:
    # The dataset's identity: where it is and exactly which files (size + mtime) it holds.
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, str(root.resolve()), classes, size, interp]).encode())
    for label, path in files:
        st = path.stat()
        h.update(f"\0{label}\0{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _read_cache(path: Path, n: int, size: int, classes: list[str]) -> ImageArray | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
            cached_classes, names = [str(c) for c in z["classes"]], [str(c) for c in z["names"]]
    except (OSError, ValueError, KeyError):
        return None  # unreadable or from another version: rebuild
    if images.shape != (n, size, size, 3) or cached_classes != classes:
        return None
    return ImageArray(images=images, labels=labels, classes=classes, names=names)


def _write_cache(path: Path, data: ImageArray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=data.images,
                labels=data.labels,
                classes=np.array(data.classes, dtype=np.str_),
                names=np.array(data.names, dtype=np.str_),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_folder(
    root: Path,
    classes: list[str],
    size: int,
    interpolation: str,
    cache_dir: Path | None = None,
    *,
    cache_tag: str | None = None,
    cache_max_bytes: int | None = None,
) -> ImageArray:
    """Decode ``root/<class>/<file>`` for the listed classes into one array.

    Files are read in sorted order per class (hidden files skipped), each decoded once. With
    ``cache_dir`` the array is stored as ``<cache_dir>/<cache_tag>-<key>.npz``, keyed by the
    folder's path, its files (names, sizes, mtimes), the classes, ``size`` and ``interpolation``;
    a later call on the same data loads it instead of decoding (and marks it used). The cache is
    written to a temporary name and renamed, and read with ``allow_pickle=False``.

    Args:
        root: dataset folder with one sub-folder per class.
        classes: class names; their order defines the labels.
        size: output side in pixels.
        interpolation: resize filter name.
        cache_dir: where to keep decoded arrays, or None for no cache.
        cache_tag: what the cache file's name starts with (the dataset id), so that everything
            derived from one dataset can be found and removed with it.
        cache_max_bytes: after writing, ``prune_cache`` keeps ``cache_dir`` within this many bytes.

    Returns:
        The decoded ``ImageArray``.

    Raises:
        TrainingError: a class folder is missing.
        BadImageError: a file does not decode (``.name`` is ``<class>/<file>``).
    """
    root = Path(root)
    resample_filter(interpolation)
    files = _class_files(root, classes)
    cache_path = None
    if cache_dir is not None:
        key = _cache_key(root, files, classes, size, interpolation)
        cache_path = Path(cache_dir) / (f"{cache_tag}-{key}.npz" if cache_tag else f"{key}.npz")
        if cache_path.is_file():
            cached = _read_cache(cache_path, len(files), size, classes)
            if cached is not None:
                with contextlib.suppress(OSError):
                    os.utime(cache_path)  # a use: least recently used goes first
                return cached

    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    names = []
    for i, (label, path) in enumerate(files):
        name = f"{classes[label]}/{path.name}"
        images[i] = to_array(open_image(path, name, min_side=size), size, interpolation)
        labels[i] = label
        names.append(name)
    data = ImageArray(images=images, labels=labels, classes=list(classes), names=names)
    if cache_path is not None:
        _write_cache(cache_path, data)
        if cache_max_bytes is not None:
            prune_cache(cache_path.parent, cache_max_bytes, keep=cache_path)
    return data


def prune_cache(directory: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Remove decoded arrays (``*.npz``) from ``directory``, least recently used first, until the rest
    fit in ``max_bytes``; ``keep`` (the one just written) stays whatever its size. Returns what went."""
    entries = []
    for path in Path(directory).glob("*.npz"):
        with contextlib.suppress(FileNotFoundError):  # another worker may prune at the same time
            st = path.stat()
            entries.append((st.st_mtime, path, st.st_size))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, path, size in sorted(entries):
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def check_trainable(data: ImageArray) -> None:
    """Raise ``TrainingError`` unless every class has at least 2 images (one per split).

    Raises:
        TrainingError: fewer than 2 classes, or a class with fewer than 2 images.
    """
    if len(data.classes) < 2:
        raise TrainingError(f"need at least 2 classes to train a classifier, got {len(data.classes)}")
    counts = data.counts()
    few = {c: n for c, n in counts.items() if n < 2}
    if few:
        listing = ", ".join(f"{c!r} ({n})" for c, n in few.items())
        raise TrainingError(
            f"every class needs at least 2 images (one for training, one for validation); too few: {listing}"
        )


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into train and validation indices.

    Each class with ``n >= 2`` images puts ``round(n * val_fraction)`` of them, clamped to
    ``[1, n - 1]``, into validation, so it appears on both sides; a class with one image goes
    to train only.

    Args:
        labels: ``int [N]`` class indices.
        val_fraction: target share of validation images, in (0, 1).
        seed: RNG seed; the same seed gives the same split.

    Returns:
        ``(train_idx, val_idx)``, sorted ``int64`` arrays.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0 if len(idx) < 2 else min(max(round(len(idx) * val_fraction), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)).astype(np.int64) if train else empty,
        np.sort(np.concatenate(val)).astype(np.int64) if val else empty,
    )
