"""Optimizers and schedules: every registry name builds and does what its name says."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from timm.optim import get_optimizer_info
from timm.scheduler.scheduler import Scheduler
from torch import nn

from models import optim
from models.optim import (
    SCHEDULE_BUILDERS,
    create_optimizer,
    create_scheduler,
    create_snapshot_scheduler,
    cycle_ends,
    group_lrs,
    lr_at_epochs,
    optimizer_kwargs,
)
from models.spec import OPTIMIZERS, SCHEDULES, OptimizerSpec, ScheduleSpec, UnknownNameError

MINIBATCH = [name for name, info in OPTIMIZERS.items() if info.timm_name]


class _Net(nn.Module):
    """A backbone (Linear + BatchNorm) and a classifier, with timm's ``get_classifier``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 3)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.stem(x))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _sgd(*lrs: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name: str) -> None:
    model = _model()
    if not OPTIMIZERS[name].timm_name:  # lbfgs: full batch on cached features, models.lbfgs
        with pytest.raises(ValueError, match="models.lbfgs"):
            create_optimizer(model, OptimizerSpec(name=name, lr=0.01))
        return
    opt = create_optimizer(model, OptimizerSpec(name=name, lr=0.01))
    before = _flat(model)
    _step(model, opt)
    assert not torch.equal(_flat(model), before)
    assert isinstance(opt, get_optimizer_info(OPTIMIZERS[name].timm_name).opt_class)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kwargs_pass_momentum_and_betas_only_where_used(name: str) -> None:
    info = OPTIMIZERS[name]
    spec = OptimizerSpec(name=name, lr=0.5, momentum=0.7, betas=(0.8, 0.9))
    if not info.timm_name:
        with pytest.raises(ValueError, match="not a mini-batch optimizer"):
            optimizer_kwargs(spec)
        return
    kwargs = optimizer_kwargs(spec)
    assert kwargs["opt"] == info.timm_name and kwargs["lr"] == 0.5
    assert (kwargs.get("momentum") == 0.7) == info.uses_momentum
    assert ("betas" in kwargs) == info.uses_betas
    if info.uses_betas:
        assert kwargs["betas"] == (0.8, 0.9)


def test_sgd_is_plain_sgd() -> None:
    # timm's "sgd" alone is Nesterov with momentum 0.9.
    model = _model()
    opt = create_optimizer(model, OptimizerSpec(name="sgd", lr=0.1, weight_decay=0.0, momentum=0.9))
    group = opt.param_groups[0]
    assert group["momentum"] == 0.0 and group["nesterov"] is False
    _step(model, opt, seed=0)
    # Second step on a fixed gradient: plain SGD moves exactly lr * grad (no remembered velocity).
    before = _flat(model)
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.ones(16, 4)), torch.zeros(16, dtype=torch.long)).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    opt.step()
    assert torch.allclose(_flat(model), before - 0.1 * grad, atol=1e-7)


def _rms_steps(alpha: float, momentum: float) -> list[float]:
    # g / sqrt(v) with v = (1 - alpha^k) g^2, through a momentum buffer
    steps, buf = [], 0.0
    for k in (1, 2, 3):
        buf = momentum * buf + 1 / math.sqrt(1 - alpha**k)
        steps.append(buf)
    return steps


# Step sizes / lr of the first three steps on a constant gradient of 3 (momentum 0.9, no decay).
CONSTANT_GRADIENT_STEPS = {
    "sgd": lambda g: [3.0, 3.0, 3.0],
    "momentum": lambda g: [3.0, 3 * 1.9, 3 * 2.71],  # v = g + 0.9 v
    "nesterov": lambda g: [3 * 1.9, 3 * 2.71, 3 * 3.439],  # g + 0.9 v, one step ahead
    "adagrad": lambda g: [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)],  # g / sqrt(k g^2)
    "rmsprop": lambda g: _rms_steps(g["alpha"], 0.9),
    "adam": lambda g: [1.0, 1.0, 1.0],  # bias-corrected m / sqrt(v) = sign(g)
    "adamw": lambda g: [1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("name", MINIBATCH)
def test_each_optimizer_takes_its_own_steps_on_a_constant_gradient(name: str) -> None:
    model = nn.Linear(1, 2, bias=False)
    nn.init.zeros_(model.weight)
    lr = 0.01
    opt = create_optimizer(model, OptimizerSpec(name=name, lr=lr, weight_decay=0.0, momentum=0.9))
    steps = []
    for _ in range(3):
        before = model.weight.detach()[0, 0].item()
        opt.zero_grad()
        (model.weight[:, 0] * torch.tensor([3.0, -3.0])).sum().backward()
        opt.step()
        steps.append((before - model.weight.detach()[0, 0].item()) / lr)
    assert steps == pytest.approx(CONSTANT_GRADIENT_STEPS[name](opt.param_groups[0]), rel=1e-4)


def test_nesterov_momentum_and_sgd_take_different_steps() -> None:
    results = {}
    for name in ("sgd", "momentum", "nesterov"):
        model = _model()
        opt = create_optimizer(model, OptimizerSpec(name=name, lr=0.05, momentum=0.9))
        assert opt.param_groups[0]["nesterov"] == (name == "nesterov")
        for seed in range(3):
            _step(model, opt, seed)
        results[name] = _flat(model)
    assert not torch.allclose(results["momentum"], results["nesterov"])
    assert not torch.allclose(results["sgd"], results["momentum"])


def test_adagrad_rmsprop_and_adam_differ() -> None:
    results = {}
    for name in ("adagrad", "rmsprop", "adam"):
        model = _model()
        opt = create_optimizer(model, OptimizerSpec(name=name, lr=0.01, weight_decay=0.0))
        for seed in range(3):
            _step(model, opt, seed)
        results[name] = _flat(model)
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(results[a], results[b]), (a, b)


def test_nesterov_with_zero_momentum_builds() -> None:
    create_optimizer(_model(), OptimizerSpec(name="nesterov", momentum=0.0))


def test_frozen_parameters_are_left_out() -> None:
    model = _model()
    model[0].requires_grad_(False)
    opt = create_optimizer(model, OptimizerSpec(name="adamw"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in in_opt and id(model[3].weight) in in_opt
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        create_optimizer(model, OptimizerSpec())


@pytest.mark.parametrize("name", MINIBATCH)
def test_include_frozen_keeps_frozen_parameters_untouched_until_unfrozen(name: str) -> None:
    model = _Net()
    model.stem.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    opt = create_optimizer(
        model, OptimizerSpec(name=name, lr=0.05, weight_decay=0.1), backbone_lr_mult=0.5, include_frozen=True
    )
    assert [p.requires_grad for p in model.parameters()] == flags  # restored exactly
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    frozen = [p.detach().clone() for p in model.stem.parameters()]
    head = model.fc.weight.detach().clone()
    for seed in range(2):
        _step(model, opt, seed)
    assert all(torch.equal(p, q) for p, q in zip(model.stem.parameters(), frozen, strict=True))
    assert not torch.equal(model.fc.weight, head)
    model.stem.requires_grad_(True)  # gradual unfreezing: the same optimizer now trains it
    _step(model, opt, 2)
    assert not torch.equal(model.stem.weight, frozen[0])


def test_weight_decay_skips_biases_and_norms_in_every_group() -> None:
    model = timm.create_model("test_efficientnet", num_classes=4)
    opt = create_optimizer(model, OptimizerSpec(name="adamw", weight_decay=0.05), backbone_lr_mult=0.1, layer_decay=0.7)
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05)


def test_backbone_lr_mult_gives_the_backbone_a_fraction_of_the_head_lr() -> None:
    model = _Net()
    opt = create_optimizer(model, OptimizerSpec(name="nesterov", lr=0.1), backbone_lr_mult=0.2)
    roles = [g["group"] for g in opt.param_groups]
    assert roles == sorted(roles, key=lambda r: r != "head")  # head first: param_groups[0] is the schedule's lr
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert all(by_param[id(p)]["group"] == "head" for p in model.fc.parameters())
    assert all(by_param[id(p)]["group"] == "backbone" for p in [*model.stem.parameters(), *model.norm.parameters()])
    assert group_lrs(opt) == pytest.approx({"head": 0.1, "backbone": 0.02})  # right before any scheduler
    spec = ScheduleSpec(name="cosine", warmup_epochs=2, warmup_lr=1e-3, min_lr=1e-4)
    sched = create_scheduler(opt, spec, epochs=6)
    expected = lr_at_epochs(spec, 6, 0.1)
    for epoch in range(6):
        sched.step(epoch)
        lrs = group_lrs(opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected[epoch])
        assert lrs["head"] == pytest.approx(expected[epoch]) and lrs["backbone"] == pytest.approx(0.2 * lrs["head"])


def test_backbone_lr_mult_needs_a_classifier() -> None:
    with pytest.raises(ValueError, match="get_classifier"):
        create_optimizer(_model(), OptimizerSpec(), backbone_lr_mult=0.1)


def test_layer_decay_lowers_the_lr_towards_the_stem_and_combines_with_the_multiplier() -> None:
    model = timm.create_model("test_efficientnet", num_classes=4)
    lr, decay, mult = 0.1, 0.5, 0.3
    opt = create_optimizer(model, OptimizerSpec(name="adam", lr=lr), layer_decay=decay, backbone_lr_mult=mult)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    order = ["conv_stem.weight", "blocks.0.0.conv.weight", "blocks.1.0.conv_exp.weight", "blocks.4.0.conv_pw.weight"]
    lrs = [lr_of[id(named[n])] for n in order] + [lr_of[id(model.get_classifier().weight)]]
    assert lrs == sorted(lrs) and len(set(lrs)) == len(lrs)
    assert lrs[-1] == pytest.approx(lr)  # the head trains at lr
    # test_efficientnet has 7 layers (stem, 5 block stages, head): the stem is 6 below the top.
    assert lrs[0] == pytest.approx(lr * mult * decay**6)
    assert lrs[3] == pytest.approx(lr * mult * decay)
    # timm's Scheduler applies each group's lr_scale to the schedule: the ratios hold through it.
    sched = create_scheduler(opt, ScheduleSpec(name="step", warmup_epochs=1, step_epochs=1, gamma=0.5), epochs=3)
    for epoch in range(3):
        sched.step(epoch)
        head = opt.param_groups[0]["lr"]
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(head * g["lr_scale"])


# --------------------------------------------------------------------------- schedules


def test_every_schedule_has_a_builder() -> None:
    assert set(SCHEDULE_BUILDERS) == set(SCHEDULES)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_builds(name: str) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = create_scheduler(opt, ScheduleSpec(name=name), epochs=10)
    assert isinstance(sched, Scheduler)
    lrs = lr_at_epochs(ScheduleSpec(name=name), 10, 0.1)
    first = 0.1 / ScheduleSpec().div_factor if name == "one_cycle" else ScheduleSpec().warmup_lr
    assert len(lrs) == 10 and lrs[0] == pytest.approx(first) and max(lrs) == pytest.approx(0.1)


def _cos(lo: float, hi: float, frac: float) -> float:
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * frac))


# name -> (spec fields, epochs, base lr, validation losses, expected lr of each epoch), hand-computed.
EXPECTED: dict[str, list[tuple[dict[str, object], int, float, list[float] | None, list[float]]]] = {
    "constant": [({"warmup_epochs": 2, "warmup_lr": 0.0}, 6, 0.1, None, [0.0, 0.05, 0.1, 0.1, 0.1, 0.1])],
    "step": [
        (
            {"warmup_epochs": 1, "warmup_lr": 0.0, "step_epochs": 2, "gamma": 0.5},
            7,
            0.1,
            None,
            [0.0, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025],
        )
    ],
    "multistep": [
        (
            {"warmup_epochs": 1, "warmup_lr": 0.0, "milestones": [2, 3], "gamma": 0.5},
            6,
            0.1,
            None,
            [0.0, 0.1, 0.1, 0.05, 0.025, 0.025],  # t = 0, 1 at lr; drops at t = 2 and t = 3
        )
    ],
    "exponential": [
        ({"warmup_epochs": 1, "warmup_lr": 0.02, "gamma": 0.5}, 5, 0.1, None, [0.02, 0.1, 0.05, 0.025, 0.0125])
    ],
    "inverse_time": [
        ({"warmup_epochs": 0, "decay": 0.5}, 4, 0.1, None, [0.1, 0.1 / 1.5, 0.1 / 2.0, 0.1 / 2.5]),
        ({"warmup_epochs": 1, "warmup_lr": 0.0, "decay": 1.0}, 3, 0.1, None, [0.0, 0.1, 0.05]),
    ],
    "cosine": [
        (
            {"warmup_epochs": 2, "warmup_lr": 0.01, "min_lr": 0.001},
            7,
            0.1,
            None,
            [0.01, 0.055] + [_cos(0.001, 0.1, t / 5) for t in range(5)],
        )
    ],
    "cosine_restarts": [
        (
            {"warmup_epochs": 1, "warmup_lr": 0.0, "min_lr": 0.0, "cycle_epochs": 2, "cycle_mult": 2.0},
            8,
            1.0,
            None,
            # cycles of 2, 4, 8 epochs after the warm-up
            [0.0, 1.0, 0.5, 1.0, _cos(0, 1, 1 / 4), 0.5, _cos(0, 1, 3 / 4), 1.0],
        ),
        (
            {"warmup_epochs": 0, "min_lr": 0.01, "cycle_epochs": 3, "cycle_mult": 1.0},
            7,
            0.1,
            None,
            [0.1, _cos(0.01, 0.1, 1 / 3), _cos(0.01, 0.1, 2 / 3)] * 2 + [0.1],
        ),
    ],
    "one_cycle": [
        (
            {"warmup_epochs": 0, "pct_start": 0.3, "div_factor": 25.0, "min_lr": 0.001},
            10,
            0.1,
            None,
            # up over round(0.3 x 10) = 3 epochs (0.004, 0.052, 0.1), cosine down to min_lr at the last
            [0.004, 0.052, 0.1] + [_cos(0.001, 0.1, k / 7) for k in range(1, 8)],
        ),
        (
            {"warmup_epochs": 2, "warmup_lr": 0.0, "pct_start": 0.3, "div_factor": 10.0, "min_lr": 0.0},
            7,
            0.1,
            None,
            # warmup_epochs is ignored (the rise is the warm-up): peak at t = round(2.1) - 1 = 1
            [0.01, 0.1] + [_cos(0, 0.1, k / 5) for k in range(1, 6)],
        ),
    ],
    "plateau": [
        (
            {"warmup_epochs": 0, "gamma": 0.5, "plateau_patience": 1, "min_lr": 0.0},
            8,
            1.0,
            [1.0, 0.9, 0.95, 0.97, 0.8, 0.85, 0.9],
            # two epochs in a row without a better loss (more than patience 1): a drop
            [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25],
        ),
        (
            {"warmup_epochs": 1, "warmup_lr": 0.0, "gamma": 0.5, "plateau_patience": 0, "min_lr": 0.0},
            6,
            1.0,
            # the warm-up epoch's loss (0.1) is not counted, or 1.0 would already be worse
            [0.1, 1.0, 1.1, 1.2, 1.3],
            [0.0, 1.0, 1.0, 0.5, 0.25, 0.125],
        ),
        (
            {"warmup_epochs": 0, "gamma": 0.1, "plateau_patience": 0, "min_lr": 0.002},
            4,
            0.1,
            [1.0, 1.0, 1.0],
            [0.1, 0.1, 0.01, 0.002],  # floored at min_lr
        ),
    ],
}


def test_every_schedule_has_hand_computed_expectations() -> None:
    assert set(EXPECTED) == set(SCHEDULES)


@pytest.mark.parametrize(
    ("name", "fields", "epochs", "base", "metrics", "expected"),
    [(name, *case) for name, cases in EXPECTED.items() for case in cases],
)
def test_schedule_produces_its_lr_sequence(
    name: str, fields: dict[str, object], epochs: int, base: float, metrics: list[float] | None, expected: list[float]
) -> None:
    spec = ScheduleSpec.model_validate({"name": name, **fields})
    assert lr_at_epochs(spec, epochs, base, metrics) == pytest.approx(expected, abs=1e-12)


def test_cosine_schedule_decays_monotonically_after_warmup() -> None:
    lrs = lr_at_epochs(ScheduleSpec(name="cosine", warmup_epochs=2), 12, 0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def test_cosine_restarts_find_long_cycles_exactly() -> None:
    # Cycles of 1, 10, 100 epochs: epoch 111 starts the fourth (timm's log-based lookup says third).
    spec = ScheduleSpec(name="cosine_restarts", warmup_epochs=0, cycle_epochs=1, cycle_mult=10.0, min_lr=0.0)
    lrs = lr_at_epochs(spec, 113, 1.0)
    assert [lrs[t] for t in (0, 1, 11, 111)] == pytest.approx([1.0] * 4)
    assert lrs[110] == pytest.approx(_cos(0, 1, 99 / 100)) and lrs[112] == pytest.approx(_cos(0, 1, 1 / 1000))


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_plateau_follows_torch_reduce_lr_on_plateau(patience: int) -> None:
    g = torch.Generator().manual_seed(patience)
    losses = [1 / (1 + 0.1 * t) + 0.2 * float(torch.rand(1, generator=g)) for t in range(30)]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=patience)
    expected = [1.0]
    for loss in losses[:-1]:
        reference.step(loss)
        expected.append(opt.param_groups[0]["lr"])
    assert len(set(expected)) > 2  # the losses do plateau now and then
    spec = ScheduleSpec(name="plateau", warmup_epochs=0, gamma=0.5, plateau_patience=patience, min_lr=0.0)
    assert lr_at_epochs(spec, 30, 1.0, losses) == pytest.approx(expected)


def test_plateau_holds_while_the_loss_improves_and_counts_each_epoch_once() -> None:
    spec = ScheduleSpec(name="plateau", warmup_epochs=0, plateau_patience=0)
    assert lr_at_epochs(spec, 6, 0.1, [1.0, 0.9, 0.8, 0.7, 0.6]) == pytest.approx([0.1] * 6)
    assert lr_at_epochs(spec, 6, 0.1) == pytest.approx([0.1] * 6)  # no losses known: no drop
    opt = _sgd(0.1)
    sched = create_scheduler(opt, spec, epochs=6)
    sched.step(0)
    sched.step(1, 1.0)
    for _ in range(3):  # the same epoch stepped again with its (worse) loss: counted once
        sched.step(2, 2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_lr_at_epochs_needs_a_loss_per_epoch() -> None:
    with pytest.raises(ValueError, match="validation loss"):
        lr_at_epochs(ScheduleSpec(name="plateau"), 5, 0.1, [1.0, 0.9])


def test_warmup_longer_than_training_leaves_one_epoch_at_base_lr() -> None:
    spec = ScheduleSpec(name="constant", warmup_epochs=10, warmup_lr=0.0)
    assert lr_at_epochs(spec, 3, 0.1) == pytest.approx([0.0, 0.05, 0.1])


def _busy_spec(name: str) -> ScheduleSpec:
    # Every field of every schedule away from its default, so that each one matters.
    return ScheduleSpec(
        name=name,
        warmup_epochs=2,
        warmup_lr=1e-3,
        min_lr=1e-4,
        step_epochs=2,
        gamma=0.5,
        milestones=[2, 4],
        decay=0.7,
        cycle_epochs=2,
        cycle_mult=2.0,
        pct_start=0.4,
        div_factor=5.0,
        plateau_patience=0,
    )


LOSSES = [1.0, 0.8, 0.9, 0.7, 0.75, 0.78, 0.6, 0.61, 0.62, 0.5, 0.55]


@pytest.mark.parametrize("name", SCHEDULES)
def test_per_group_lr_scale_is_kept_by_every_schedule(name: str) -> None:
    model = _Net()
    opt = create_optimizer(model, OptimizerSpec(name="adamw", lr=0.1), backbone_lr_mult=0.25)
    sched = create_scheduler(opt, _busy_spec(name), epochs=10)
    for epoch in range(10):
        sched.step(epoch, LOSSES[epoch - 1] if epoch else None)
        lrs = group_lrs(opt)
        assert lrs["backbone"] == pytest.approx(0.25 * lrs["head"])
    # Groups with their own base lr and no lr_scale: each is scheduled from its own base.
    spec = _busy_spec(name).model_copy(update={"warmup_lr": 0.0, "min_lr": 0.0})
    opt = _sgd(0.1, 0.03)
    sched = create_scheduler(opt, spec, epochs=10)
    for epoch in range(10):
        sched.step(epoch, LOSSES[epoch - 1] if epoch else None)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.3 * opt.param_groups[0]["lr"])


def _run(name: str, epochs: int, split: int | None, snapshot: bool = False) -> list[list[float]]:
    """Every group's lr per epoch; with ``split``, rebuilt from JSON'd state dicts after that many epochs."""

    def build() -> tuple[torch.optim.Optimizer, Scheduler]:
        opt = create_optimizer(_Net(), OptimizerSpec(name="nesterov", lr=0.1), backbone_lr_mult=0.5)
        if snapshot:
            return opt, create_snapshot_scheduler(opt, _busy_spec(name), epochs=epochs, cycles=3)
        return opt, create_scheduler(opt, _busy_spec(name), epochs=epochs)

    opt, sched = build()
    lrs = []
    for epoch in range(epochs):
        if epoch == split:
            saved_opt = copy.deepcopy(opt.state_dict())
            saved = json.loads(json.dumps(sched.state_dict()))  # checkpoints keep it as JSON
            opt, sched = build()
            opt.load_state_dict(saved_opt)
            sched.load_state_dict(saved)
        sched.step(epoch, LOSSES[epoch - 1] if epoch else None)
        lrs.append([g["lr"] for g in opt.param_groups])
    return lrs


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_restored_scheduler_continues_exactly(name: str) -> None:
    straight = _run(name, 11, None)
    assert len({tuple(x) for x in straight}) > 1
    for split in (1, 3, 6, 9):
        assert _run(name, 11, split) == straight, split
    if name == "plateau":  # the restored state is what carries the drops
        assert straight[-1][0] < 0.1 * 0.5**2


def test_unknown_schedule_is_an_error_not_none(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UnknownNameError, match="valid: "):
        create_scheduler(opt, ScheduleSpec.model_construct(**{**ScheduleSpec().model_dump(), "name": "wsd2"}), epochs=5)
    # timm's factory returns None for a name it does not know: that must not pass silently.
    monkeypatch.setattr(optim, "create_scheduler_v2", lambda *a, **k: (None, 5))
    with pytest.raises(UnknownNameError):
        create_scheduler(opt, ScheduleSpec(name="cosine"), epochs=5)


# --------------------------------------------------------------------------- snapshot ensembles


def test_cycle_ends_split_the_epochs_evenly() -> None:
    assert cycle_ends(9, 3) == [2, 5, 8]
    assert cycle_ends(10, 3) == [3, 6, 9]
    assert cycle_ends(11, 3) == [3, 7, 10]
    assert cycle_ends(4, 4) == [0, 1, 2, 3]
    assert cycle_ends(5, 1) == [4]
    for bad in ((3, 4), (3, 0)):
        with pytest.raises(ValueError, match="cycles"):
            cycle_ends(*bad)


def test_snapshot_schedule_restarts_every_cycle_with_warmup_only_in_the_first() -> None:
    spec = ScheduleSpec(name="step", warmup_epochs=1, warmup_lr=0.0, min_lr=0.0)  # name is not used
    lrs = lr_at_epochs(spec, 10, 1.0, cycles=3)  # cycles: epochs 0-3 (warm-up + 3), 4-6, 7-9
    third = [1.0, _cos(0, 1, 1 / 3), _cos(0, 1, 2 / 3)]
    assert lrs == pytest.approx([0.0, *third, *third, *third])
    no_warmup = lr_at_epochs(spec.model_copy(update={"warmup_epochs": 0}), 6, 1.0, cycles=2)
    assert no_warmup == pytest.approx(third * 2)
    for end in cycle_ends(10, 3)[:-1]:
        assert lrs[end + 1] == pytest.approx(1.0)


def test_a_restored_snapshot_scheduler_continues_exactly() -> None:
    straight = _run("cosine", 11, None, snapshot=True)
    assert _run("cosine", 11, 5, snapshot=True) == straight
