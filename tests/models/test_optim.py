"""Optimizers and schedules: every registry name builds and does what its name says."""

from __future__ import annotations

import math

import pytest
import torch
from timm.optim import get_optimizer_info
from timm.scheduler.scheduler import Scheduler
from torch import nn

from models import optim
from models.optim import create_optimizer, create_scheduler, lr_at_epochs, optimizer_kwargs
from models.spec import OPTIMIZERS, SCHEDULES, OptimizerSpec, ScheduleSpec, UnknownNameError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name: str) -> None:
    model = _model()
    opt = create_optimizer(model, OptimizerSpec(name=name, lr=0.01))
    before = _flat(model)
    _step(model, opt)
    assert not torch.equal(_flat(model), before)
    assert isinstance(opt, get_optimizer_info(OPTIMIZERS[name].timm_name).opt_class)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kwargs_pass_momentum_and_betas_only_where_used(name: str) -> None:
    info = OPTIMIZERS[name]
    kwargs = optimizer_kwargs(OptimizerSpec(name=name, lr=0.5, momentum=0.7, betas=(0.8, 0.9)))
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


def test_nesterov_and_momentum_take_different_steps() -> None:
    results = {}
    for name in ("momentum", "nesterov"):
        model = _model()
        opt = create_optimizer(model, OptimizerSpec(name=name, lr=0.05, momentum=0.9))
        assert opt.param_groups[0]["nesterov"] == (name == "nesterov")
        for seed in range(3):
            _step(model, opt, seed)
        results[name] = _flat(model)
    assert not torch.allclose(results["momentum"], results["nesterov"])


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


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_builds(name: str) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = create_scheduler(opt, ScheduleSpec(name=name), epochs=10)
    assert isinstance(sched, Scheduler)
    lrs = lr_at_epochs(ScheduleSpec(name=name), 10, 0.1)
    assert len(lrs) == 10 and lrs[0] == pytest.approx(1e-5) and max(lrs) == pytest.approx(0.1)


def test_constant_schedule_warms_up_then_holds() -> None:
    spec = ScheduleSpec(name="constant", warmup_epochs=2, warmup_lr=0.0)
    assert lr_at_epochs(spec, 6, 0.1) == pytest.approx([0.0, 0.05, 0.1, 0.1, 0.1, 0.1])


def test_step_schedule_decays_every_step_epochs_after_warmup() -> None:
    spec = ScheduleSpec(name="step", warmup_epochs=1, warmup_lr=0.0, step_epochs=2, gamma=0.5)
    assert lr_at_epochs(spec, 7, 0.1) == pytest.approx([0.0, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_cosine_schedule_warms_up_then_decays_to_min_lr() -> None:
    spec = ScheduleSpec(name="cosine", warmup_epochs=2, warmup_lr=0.01, min_lr=0.001)
    base, epochs, decay = 0.1, 7, 5
    expected = [0.01, 0.055] + [
        0.001 + 0.5 * (base - 0.001) * (1 + math.cos(math.pi * t / decay)) for t in range(decay)
    ]
    lrs = lr_at_epochs(spec, epochs, base)
    assert lrs == pytest.approx(expected)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def test_warmup_longer_than_training_leaves_one_epoch_at_base_lr() -> None:
    spec = ScheduleSpec(name="constant", warmup_epochs=10, warmup_lr=0.0)
    assert lr_at_epochs(spec, 3, 0.1) == pytest.approx([0.0, 0.05, 0.1])


def test_unknown_schedule_is_an_error_not_none(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UnknownNameError, match="valid: "):
        create_scheduler(opt, ScheduleSpec.model_construct(**{**ScheduleSpec().model_dump(), "name": "wsd2"}), epochs=5)
    # timm's factory returns None for a name it does not know: that must not pass silently.
    monkeypatch.setattr(optim, "create_scheduler_v2", lambda *a, **k: (None, 5))
    with pytest.raises(UnknownNameError):
        create_scheduler(opt, ScheduleSpec(name="cosine"), epochs=5)
