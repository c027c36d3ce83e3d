"""Small real datasets for the API and worker tests (animal-mnist silhouettes)."""

from __future__ import annotations

from functools import lru_cache

from service.sample_data import animal_split, zip_dataset


@lru_cache
def animals(per_class: int = 6, test_per_class: int = 2, classes: int = 3) -> tuple[list, list]:
    train, test = animal_split(per_class=per_class, test_per_class=test_per_class, seed=1)
    keep = {name for name, _, _ in train[: per_class * classes]}
    return [t for t in train if t[0] in keep], [t for t in test if t[0] in keep]


def animals_zip(per_class: int = 6, classes: int = 3) -> bytes:
    return zip_dataset(animals(per_class, 2, classes)[0])


# A fast recipe for plumbing tests: the tiny timm test network, a few epochs.
TINY_JOB = {
    "backbone": "test_efficientnet",
    "weights": "none",
    "image_size": 32,
    "freeze": {"mode": "none"},
    "epochs": 2,
    "batch_size": 8,
    "schedule": {"name": "constant", "warmup_epochs": 0},
    "optimizer": {"name": "adam", "lr": 0.001},
    "patience": None,
}
