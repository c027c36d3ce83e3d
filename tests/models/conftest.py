"""Fixtures of the models suite: small real datasets decoded once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from models.data import ImageArray, load_folder
from models.spec import TrainSpec
from models.zoo import preprocess_for
from tests.utils.datasets import LFW_CLASSES, lfw_folder

# test_efficientnet at 32 px keeps a training epoch on the 200 LFW crops around a second.
TINY = {"backbone": "test_efficientnet", "weights": "none", "image_size": 32}


def _tiny_spec(**overrides: object) -> TrainSpec:
    fields: dict[str, object] = {
        **TINY,
        "epochs": 2,
        "batch_size": 32,
        "freeze": {"mode": "none"},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_epochs": 0},
        "patience": None,
    }
    fields.update(overrides)
    return TrainSpec.model_validate(fields)


@pytest.fixture(scope="session")
def tiny_spec() -> Callable[..., TrainSpec]:
    """Factory of fast recipes on timm's tiny test network; keyword arguments override fields."""
    return _tiny_spec


@pytest.fixture(scope="session")
def lfw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LFW subset written as class folders of PNGs."""
    return lfw_folder(tmp_path_factory.mktemp("lfw"))


@pytest.fixture(scope="session")
def lfw_data(lfw_root: Path) -> ImageArray:
    """The LFW subset decoded at the tiny recipe's size."""
    pre = preprocess_for(TINY["backbone"], TINY["image_size"])
    return load_folder(lfw_root, LFW_CLASSES, pre.image_size, pre.interpolation, cache_dir=None)


@pytest.fixture
def two_torch_threads():
    """Torch on two threads for the test, as the machine's CI has; the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
