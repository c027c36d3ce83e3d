"""Transfer learning works: bundled ImageNet weights beat random init on real data."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from models.data import load_folder
from models.spec import TrainSpec
from models.training import train
from models.zoo import preprocess_for
from tests.utils.datasets import ANIMAL_CLASSES, animals_folder


@pytest.mark.slow
def test_imagenet_weights_beat_random_init_on_animal_silhouettes(tmp_path: Path) -> None:
    # 30 de-duplicated silhouettes a class (240 train / 60 val), 64 px, 5 epochs: ~40 s on 2 cores.
    root = animals_folder(tmp_path, per_class=30, seed=0)
    recipe = {
        "backbone": "tf_efficientnet_lite0",
        "image_size": 64,
        "epochs": 5,
        "batch_size": 32,
        "patience": None,
        "seed": 0,
        "freeze": {"mode": "first_n", "stages": 2},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
    }
    pre = preprocess_for("tf_efficientnet_lite0", 64)
    data = load_folder(root, ANIMAL_CLASSES, pre.image_size, pre.interpolation, cache_dir=tmp_path / "cache")
    assert len(data) == 300

    acc, seconds = {}, {}
    for weights in ("bundled", "none"):
        t0 = time.perf_counter()
        result = train(data, TrainSpec.model_validate({**recipe, "weights": weights}), device="cpu")
        acc[weights], seconds[weights] = result.val_acc, time.perf_counter() - t0
    print(
        f"\ntransfer: bundled {acc['bundled']:.3f} vs none {acc['none']:.3f} "
        f"({seconds['bundled']:.1f}s + {seconds['none']:.1f}s)"
    )
    assert acc["bundled"] >= acc["none"] + 0.15
    assert acc["bundled"] >= 0.6
