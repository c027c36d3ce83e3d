"""What a job will cost, known before it runs: the decoded array's bytes and the pixels it trains on.

Torch-free, like ``models.spec``: the API checks every job against its limits before queueing it.

The worker decodes the whole dataset once into one ``uint8`` array of ``images x side x side x 3``
(``models.data.load_folder``), where ``side`` is the job's ``image_size`` or, when it has none,
its backbone's native input size. Training then passes every image (training and validation
split alike) through the network once per epoch, so the work of a job is measured in
*pixel-epochs*::

    pixel_epochs = images x side**2 x epochs

    epochs = final-training epochs + sweep epochs
    final-training epochs = spec.epochs x ensemble.members   (a snapshot ensemble: spec.epochs,
                                                              one run whose cycles are the members)
    sweep epochs = for each of sweep.rounds rounds, the sum over successive-halving rungs of
                   (trials still in) x (the rung's epochs), every trial one member, as
                   ``models.sweep.run_sweep`` schedules them when every trial succeeds

It is an upper bound of the work actually done: early stopping (``patience``), trials that
fail, and the frozen-prefix feature cache (which skips the frozen layers) only make a job
cheaper. Batch size changes memory per step, not the pixels processed, so it does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel

from .spec import BACKBONES, SweepSpec, TrainSpec

__all__ = [
    "JobCost", "decoded_side", "default_budget_applies", "explicit_fields", "final_epochs", "job_cost", "sweep_epochs",
]

# One byte per channel, three channels: the decoded array's bytes per pixel.
BYTES_PER_PIXEL = 3


@dataclass(frozen=True)
class JobCost:
    """The size of one job on one dataset.

    Attributes:
        images: images in the dataset.
        side: decoded side in pixels.
        members: ensemble members of the final training.
        final_epochs: epochs over the data of the final training (all members).
        sweep_epochs: epochs over the data of the sweep's trials (0 without a sweep).
    """

    images: int
    side: int
    members: int
    final_epochs: int
    sweep_epochs: int

    @property
    def epochs(self) -> int:
        """Every epoch over the data the job may run: the final training's and the sweep's."""
        return self.final_epochs + self.sweep_epochs

    @property
    def decoded_bytes(self) -> int:
        """The decoded dataset in memory: ``images x side**2 x 3`` bytes."""
        return self.images * self.side * self.side * BYTES_PER_PIXEL

    @property
    def pixel_epochs(self) -> int:
        """``images x side**2 x epochs``: the pixels the job pushes through the network, at most."""
        return self.images * self.side * self.side * self.epochs


def decoded_side(spec: TrainSpec) -> int:
    """The side the worker decodes images at: ``image_size``, else the backbone's native size."""
    return spec.image_size or BACKBONES[spec.backbone].input_size


def final_epochs(spec: TrainSpec) -> int:
    """Epochs of the final training over all its members (a snapshot ensemble is one run)."""
    return spec.epochs if spec.ensemble.snapshot else spec.epochs * spec.ensemble.members


def _round_epochs(sweep: SweepSpec, max_epochs: int) -> int:
    # The schedule of ``models.sweep.run_sweep`` when every trial succeeds (a test keeps them equal).
    total, alive, rung = 0, sweep.trials, 0
    while True:
        epochs = min(sweep.min_epochs * sweep.eta**rung, max_epochs)
        total += alive * epochs
        keep = math.ceil(alive / sweep.eta)
        if alive == 1 or epochs >= max_epochs or keep == 1:
            return total
        alive, rung = keep, rung + 1


def sweep_epochs(spec: TrainSpec) -> int:
    """Epochs the sweep's trials train in all (0 without a sweep); an upper bound, as trials may fail."""
    if spec.sweep is None:
        return 0
    return spec.sweep.rounds * _round_epochs(spec.sweep, spec.epochs)


def job_cost(spec: TrainSpec, images: int) -> JobCost:
    """The cost of training ``spec`` on a dataset of ``images`` images (see the module's docstring)."""
    return JobCost(
        images=images,
        side=decoded_side(spec),
        members=spec.ensemble.members,
        final_epochs=final_epochs(spec),
        sweep_epochs=sweep_epochs(spec),
    )


# --------------------------------------------------------------------------- time budgets (models.planner)


def _set_paths(model: BaseModel, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name in model.model_fields_set:
        value = getattr(model, name)
        if value is None and type(model).model_fields[name].default is None:
            continue  # an optional section sent as null is its default, not a choice
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel) and value.model_fields_set:
            out |= _set_paths(value, path + ".")
        else:
            out.add(path)
    return out


def explicit_fields(spec: TrainSpec) -> list[str]:
    """The training fields the user set (dotted), which the planner keeps: ``spec.keep`` when the
    service filled it, else the fields set on ``spec``; ``budget_s``, ``keep``, ``seed`` and ``device`` (where
    it trains, not how) excluded."""
    paths = set(spec.keep) if spec.keep is not None else _set_paths(spec)
    return sorted(p for p in paths if p.split(".")[0] not in ("budget_s", "keep", "seed", "device", "dataset_id"))


def default_budget_applies(spec: TrainSpec) -> bool:
    """A job with no budget whose request set no training field gets the device's default budget."""
    return spec.budget_s is None and spec.keep is not None and not explicit_fields(spec)


def _kept(keep: list[str], path: str) -> bool:
    """Whether ``path`` (or a part of it, or a whole it belongs to) was set by the user."""
    return any(k == path or path.startswith(k + ".") or k.startswith(path + ".") for k in keep)
