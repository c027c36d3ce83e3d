"""Optimizers and learning-rate schedules from the job spec, through timm's factories.

``optimizer_kwargs`` is the adapter from ``OptimizerSpec`` to the keyword arguments of
``timm.optim.create_optimizer_v2`` (timm's ``train.py`` does the same with its argparse config).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from .spec import OPTIMIZERS, SCHEDULES, OptimizerSpec, ScheduleSpec, UnknownNameError, check_name


def optimizer_kwargs(spec: OptimizerSpec) -> dict[str, Any]:
    """Keyword arguments for ``timm.optim.create_optimizer_v2`` from a spec.

    ``momentum`` is passed only for optimizers that use it and ``betas`` only for those that use
    betas. timm's ``sgd`` is Nesterov SGD with momentum 0.9 by default; zoofit's ``sgd`` is plain
    SGD, so it gets ``momentum=0.0, nesterov=False`` explicitly. Nesterov with zero momentum is
    plain SGD too (torch refuses ``nesterov=True`` with zero momentum).

    Args:
        spec: the job's optimizer settings.

    Returns:
        ``opt``, ``lr``, ``weight_decay`` and the optimizer-specific keys.
    """
    info = OPTIMIZERS[check_name("optimizer", spec.name, list(OPTIMIZERS))]
    timm_info = get_optimizer_info(info.timm_name)
    kwargs: dict[str, Any] = {"opt": info.timm_name, "lr": spec.lr, "weight_decay": spec.weight_decay}
    nesterov_default = bool((timm_info.defaults or {}).get("nesterov", False))
    if info.uses_momentum:
        kwargs["momentum"] = spec.momentum
        if nesterov_default and spec.momentum == 0.0:
            kwargs["nesterov"] = False
    elif timm_info.has_momentum:
        kwargs["momentum"] = 0.0
        if nesterov_default:
            kwargs["nesterov"] = False
    if info.uses_betas:
        kwargs["betas"] = tuple(spec.betas)
    return kwargs


def create_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """Optimizer over the trainable parameters of ``model``.

    Weight decay skips biases and normalisation weights (timm's default grouping); frozen
    parameters (``requires_grad=False``) are left out.

    Args:
        model: the model to optimise.
        spec: the job's optimizer settings.

    Returns:
        A torch optimizer.

    Raises:
        ValueError: ``model`` has no trainable parameter.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    return create_optimizer_v2(model, **optimizer_kwargs(spec))


def create_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, *, epochs: int) -> Scheduler:
    """timm learning-rate scheduler over ``epochs`` epochs, stepped per epoch.

    Linear warm-up from ``warmup_lr`` to the optimizer's lr over ``warmup_epochs``, then
    ``constant`` (hold), ``step`` (times ``gamma`` every ``step_epochs``) or ``cosine`` (down to
    ``min_lr`` at the end of ``epochs``). Warm-up counts within ``epochs`` and is shortened to
    leave at least one epoch at the base lr. Call
    ``scheduler.step(epoch)`` at the start of each epoch (0-based) to set its lr.

    Args:
        optimizer: the optimizer whose lr is scheduled (its current lr is the base lr).
        spec: the job's schedule settings.
        epochs: total training epochs, warm-up included.

    Returns:
        A ``timm.scheduler.Scheduler``.

    Raises:
        UnknownNameError: unknown schedule name.
    """
    check_name("schedule", spec.name, SCHEDULES)
    warmup = min(spec.warmup_epochs, max(epochs - 1, 0))
    kwargs: dict[str, Any] = {
        "sched": spec.name,
        "num_epochs": max(epochs - warmup, 1),
        "warmup_epochs": warmup,
        "warmup_lr": spec.warmup_lr,
        "warmup_prefix": True,
        "min_lr": spec.min_lr,
    }
    if spec.name == "step":
        kwargs.update(decay_epochs=spec.step_epochs, decay_rate=spec.gamma)
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs)
    if scheduler is None:  # timm returns None for names it does not know
        raise UnknownNameError("schedule", spec.name, list(SCHEDULES))
    return scheduler


def lr_at_epochs(spec: ScheduleSpec, epochs: int, base_lr: float) -> list[float]:
    """The lr of each epoch (0-based) that ``create_scheduler`` produces for ``base_lr``.

    Args:
        spec: schedule settings.
        epochs: total epochs.
        base_lr: the optimizer's lr.

    Returns:
        ``epochs`` learning rates.
    """
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = create_scheduler(optimizer, spec, epochs=epochs)
    lrs = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    return lrs
