"""``jobs submit``: the preset's job, deep-merged with the recipe file, then ``--set`` (YAML scalars)."""

from __future__ import annotations

import pytest

from service.client.recipe import RecipeError, build_job, deep_merge, load_recipe, parse_set
from service.presets import PRESETS


@pytest.mark.parametrize(("arg", "expected"), [
    ("optimizer.lr=0.01", {"optimizer": {"lr": 0.01}}),
    ("epochs=3", {"epochs": 3}),
    ("ensemble.ema=true", {"ensemble": {"ema": True}}),
    ("patience=", {"patience": None}),
    ("patience=null", {"patience": None}),
    ("backbone=tf_efficientnet_lite0", {"backbone": "tf_efficientnet_lite0"}),
    ("seed='7'", {"seed": "7"}),
    ("a.b.c=[1, 2]", {"a": {"b": {"c": [1, 2]}}}),
    ("name=x=y", {"name": "x=y"}),
])
def test_parse_set(arg, expected):
    assert parse_set(arg) == expected


@pytest.mark.parametrize("arg", ["epochs", "=3", "a..b=1", "x=[1,"])
def test_parse_set_refuses_malformed(arg):
    with pytest.raises(RecipeError):
        parse_set(arg)


def test_deep_merge_keeps_inputs_and_merges_nested():
    base = {"optimizer": {"name": "sgd", "lr": 0.1}, "epochs": 5}
    out = deep_merge(base, {"optimizer": {"lr": 0.01}, "seed": 1})
    assert out == {"optimizer": {"name": "sgd", "lr": 0.01}, "epochs": 5, "seed": 1}
    assert base == {"optimizer": {"name": "sgd", "lr": 0.1}, "epochs": 5}


def test_preset_then_file_then_set(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\noptimizer:\n  momentum: 0.8\ndataset_id: from-file\nensemble:\n  ema: false\n")
    best = PRESETS["best"].job
    job = build_job(best, load_recipe(recipe), ["optimizer.lr=0.005", "ensemble.members=2"], dataset_id="ds1")
    assert job["dataset_id"] == "ds1"
    assert job["epochs"] == 2  # the file over the preset
    assert job["optimizer"] == {"momentum": 0.8, "lr": 0.005}
    assert job["ensemble"] == {**best["ensemble"], "ema": False, "members": 2}  # merged, not replaced
    assert job["budget_s"] == best["budget_s"]
    assert PRESETS["best"].job["ensemble"] == {"ema": True, "greedy": True}  # the preset itself untouched


def test_json_recipe_and_errors(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"epochs": 4, "dataset_id": "d"}')
    assert build_job(None, load_recipe(p)) == {"epochs": 4, "dataset_id": "d"}
    p.write_text("[1, 2]")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="no dataset"):
        build_job({"epochs": 1})
    with pytest.raises(RecipeError, match="not a mapping"):
        build_job({"epochs": 1}, sets=["epochs.x=1"], dataset_id="d")
