"""optimizer.lr 'auto': the learning-rate range test, its record and figure; the schema accepts it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from models.data import ImageArray
from models.lr_finder import PICK_BOUNDS, max_lr_for, suggest
from models.plots import render_figure
from models.spec import TrainSpec
from models.training import train


def test_auto_validates_and_other_strings_do_not() -> None:
    assert TrainSpec.model_validate({"optimizer": {"lr": "auto"}}).optimizer.lr == "auto"
    with pytest.raises(ValueError):
        TrainSpec.model_validate({"optimizer": {"lr": "fast"}})
    with pytest.raises(ValueError):
        TrainSpec.model_validate({"optimizer": {"lr": 0}})
    with pytest.raises(ValueError, match="L-BFGS"):
        TrainSpec.model_validate({"optimizer": {"name": "lbfgs", "lr": "auto"}, "freeze": {"mode": "linear_probe"},
                                  "head_dropout": 0})
    schema = TrainSpec.model_json_schema()["$defs"]["OptimizerSpec"]["properties"]["lr"]
    assert {"title": "LrAuto", "type": "string", "enum": ["auto"]} in schema["anyOf"]


def test_suggest_picks_a_tenth_of_the_minimum() -> None:
    lrs = list(np.logspace(-6, 1, 50))
    loss = [2.0 - (i / 30) if i < 30 else 1.0 + (i - 30) ** 2 for i in range(50)]
    pick, min_div10, steepest, _ = suggest(lrs, loss, max_lr=10)
    assert min_div10 == pytest.approx(lrs[30] / 10) and pick == pytest.approx(min_div10)
    assert steepest < lrs[30]
    capped, *_ = suggest(lrs, loss, max_lr=1e-4)
    assert capped == 1e-4


def test_lr_finder_on_a_tiny_real_model(lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]) -> None:
    torch.set_num_threads(1)
    # A linear probe: the test steps run on cached features (the finder trains what will train).
    spec = tiny_spec(epochs=1, optimizer={"name": "adamw", "lr": "auto"}, freeze={"mode": "linear_probe"})
    result = train(lfw_data, spec, device="cpu")
    report = result.report()
    lf = report["lr_finder"]
    assert PICK_BOUNDS[0] <= lf["lr"] <= PICK_BOUNDS[1]
    assert len(lf["lrs"]) == len(lf["losses"]) == len(lf["smoothed"]) == lf["iterations"] >= 3
    assert lf["lrs"] == sorted(lf["lrs"])
    # The run trained at the pick: the head group's initial lr.
    assert report["applied"]["members"][0]["param_groups"][0]["lr"] == pytest.approx(lf["lr"])
    assert report["applied"]["members"][0]["lr_finder"]["lr"] == lf["lr"]
    assert render_figure("lr_finder", report).startswith(b"\x89PNG")


def test_the_cap_is_lower_once_backbone_layers_train() -> None:
    # 0.1 suits a new linear head alone; SGD at 0.1 on the top stage wrecked animal-mnist (issue #14).
    assert max_lr_for("nesterov", fine_tune=False) == 0.1
    assert max_lr_for("nesterov", fine_tune=True) <= 0.02
    assert max_lr_for("adamw", fine_tune=True) <= max_lr_for("adamw", fine_tune=False) <= 0.01


def test_a_fine_tune_trains_at_most_at_the_fine_tune_cap(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    torch.set_num_threads(1)
    spec = tiny_spec(epochs=1, optimizer={"name": "nesterov", "lr": "auto"}, freeze={"mode": "first_n", "stages": 2})
    report = train(lfw_data, spec, device="cpu").report()
    assert report["lr_finder"]["lr"] <= max_lr_for("nesterov", fine_tune=True)
