"""The cost estimate a job is checked against before it is queued (``models.budget``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from models.budget import job_cost, sweep_epochs
from models.spec import BACKBONES, TrainSpec
from models.sweep import run_sweep
from models.zoo import preprocess_for


@pytest.mark.parametrize("name", list(BACKBONES))
def test_registry_input_size_is_timms(name: str) -> None:
    # The API reads the native size from the registry (no timm import); it must be timm's.
    assert BACKBONES[name].input_size == preprocess_for(name).image_size


@pytest.mark.parametrize(
    ("trials", "eta", "min_epochs", "rounds", "epochs"),
    [(8, 2, 1, 1, 8), (8, 2, 1, 2, 3), (9, 3, 2, 1, 5), (4, 2, 4, 1, 2), (64, 3, 1, 4, 1000), (2, 8, 1, 3, 10)],
)
def test_sweep_epochs_are_what_run_sweep_trains(tiny_spec, trials, eta, min_epochs, rounds, epochs) -> None:
    spec = tiny_spec(epochs=epochs, sweep={"trials": trials, "eta": eta, "min_epochs": min_epochs, "rounds": rounds})

    def fake_train(_data, trial: TrainSpec, **_kw: object) -> SimpleNamespace:
        return SimpleNamespace(val_acc=trial.optimizer.lr, val_loss=1.0)  # every trial succeeds

    assert sweep_epochs(spec) == run_sweep(None, spec, train_fn=fake_train).epochs_trained


def test_job_cost_is_images_times_pixels_times_epochs(tiny_spec) -> None:
    spec = tiny_spec(image_size=64, epochs=10, ensemble={"members": 3})
    cost = job_cost(spec, 100)
    assert (cost.images, cost.side, cost.epochs) == (100, 64, 30)
    assert cost.decoded_bytes == 100 * 64 * 64 * 3
    assert cost.pixel_epochs == 100 * 64 * 64 * 30
    # a snapshot ensemble is one run: its members share the epochs
    assert job_cost(tiny_spec(epochs=10, ensemble={"members": 3, "snapshot": True}), 100).epochs == 10
    # the sweep's trials come on top of the final training
    swept = tiny_spec(epochs=8, sweep={"trials": 8, "eta": 2, "rounds": 1})
    assert job_cost(swept, 100).epochs == 8 + (8 * 1 + 4 * 2 + 2 * 4)
    # no image_size: the backbone's native size
    assert job_cost(TrainSpec(), 1).side == 224
    assert job_cost(TrainSpec(backbone="tf_efficientnet_lite2"), 1).side == 260


def test_the_issues_dataset_decodes_to_157_gb(tiny_spec) -> None:
    cost = job_cost(tiny_spec(image_size=1024), 50_000)
    assert cost.decoded_bytes == 157_286_400_000
