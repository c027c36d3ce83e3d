"""Optimizers and learning-rate schedules from the job spec, through timm's factories.

``optimizer_kwargs`` is the adapter from ``OptimizerSpec`` to the keyword arguments of
``timm.optim.create_optimizer_v2`` (timm's ``train.py`` does the same with its argparse config).
``create_optimizer`` adds discriminative learning rates on top of timm's parameter groups, as an
``lr_scale`` per group, the key timm's layer-wise decay uses and timm's schedulers apply.

Schedules are ``timm.scheduler.Scheduler`` objects. ``constant``, ``step``, ``exponential``,
``multistep`` and ``cosine`` come from ``timm.scheduler.create_scheduler_v2``; the rest are small
``Scheduler`` subclasses here, for what timm lacks or gets wrong for this contract (see each class).
All of them follow one contract:

* ``scheduler.step(epoch, metric)`` at the start of each 0-based epoch, ``metric`` being the previous
  epoch's validation loss (``None`` at epoch 0; only ``plateau`` reads it);
* afterwards every param group's ``"lr"`` is the epoch's lr: the schedule applied to the group's base
  lr (its ``"initial_lr"``), times the group's ``"lr_scale"`` when it has one;
* ``state_dict()`` is plain JSON-able data and ``load_state_dict`` of it into a fresh scheduler for
  the same optimizer continues the run exactly.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from .spec import OPTIMIZERS, SCHEDULES, OptimizerSpec, ScheduleSpec, UnknownNameError, check_name

HEAD = "head"
BACKBONE = "backbone"

# --------------------------------------------------------------------------- optimizers


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

    Raises:
        ValueError: the optimizer is not a mini-batch (timm) optimizer (``lbfgs``).
    """
    info = OPTIMIZERS[check_name("optimizer", spec.name, list(OPTIMIZERS))]
    if not info.timm_name:
        raise ValueError(
            f"optimizer {spec.name!r} is not a mini-batch optimizer: it fits a linear head full batch "
            "on cached features (models.lbfgs.LbfgsProbe / fit_linear_lbfgs)"
        )
    timm_info = get_optimizer_info(info.timm_name)
    kwargs: dict[str, Any] = {"opt": info.timm_name, "lr": spec.lr_value(), "weight_decay": spec.weight_decay}
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


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``model.get_classifier()`` (timm's head); empty when the model has none."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return []
    heads = get_classifier()
    modules = heads if isinstance(heads, tuple | list) else (heads,)
    return [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]


@contextlib.contextmanager
def _all_requiring_grad(model: nn.Module) -> Iterator[None]:
    # timm's grouping skips requires_grad=False parameters; unfreeze for the grouping only.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def create_optimizer(
    model: nn.Module,
    spec: OptimizerSpec,
    *,
    backbone_lr_mult: float = 1.0,
    layer_decay: float | None = None,
    include_frozen: bool = False,
) -> torch.optim.Optimizer:
    """Optimizer over ``model``'s parameters with discriminative learning rates.

    Parameter groups are timm's (``param_groups_weight_decay``, or ``param_groups_layer_decay``
    with ``layer_decay``): no weight decay on biases and normalisation weights. Each is then split
    into its classifier part (``model.get_classifier()``) and its backbone part, and every group gets:

    * ``"group"``: ``"head"`` or ``"backbone"``;
    * ``"lr_scale"``: 1 for the head; ``backbone_lr_mult`` x timm's layer scale (``layer_decay`` to
      the power of the layer's distance from the top) for the backbone;
    * ``"initial_lr"``: ``spec.lr``, the base that schedules scale (timm's ``Scheduler`` reads it);
    * ``"lr"``: ``spec.lr x lr_scale``, so the optimizer is right before any scheduler step too.

    Head groups come first, so ``param_groups[0]["lr"]`` is the schedule's lr (``lr_at_epochs``).

    Args:
        model: the model to optimise.
        spec: the job's optimizer settings.
        backbone_lr_mult: lr multiplier of every non-classifier parameter.
        layer_decay: timm layer-wise lr decay (each layer lower gets this factor once more), or None.
        include_frozen: also put ``requires_grad=False`` parameters in the groups, so that gradual
            unfreezing needs no new optimizer. Torch optimizers skip parameters whose ``.grad`` is
            None, so they stay untouched (weight decay included) until they get gradients; their
            ``requires_grad`` flags are left exactly as they were.

    Returns:
        A torch optimizer.

    Raises:
        ValueError: no parameter to optimise; ``backbone_lr_mult`` != 1 for a model without a
            classifier; a bad multiplier or decay; ``spec`` names ``lbfgs``.
    """
    if not backbone_lr_mult > 0:
        raise ValueError(f"backbone_lr_mult must be positive, got {backbone_lr_mult}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    kwargs = optimizer_kwargs(spec)
    params = list(model.parameters())
    if not (params if include_frozen else [p for p in params if p.requires_grad]):
        raise ValueError("the model has no trainable parameters")
    head = {id(p) for p in classifier_parameters(model)}
    if backbone_lr_mult != 1.0 and not head:
        raise ValueError("backbone_lr_mult needs a model with a classifier (model.get_classifier())")

    no_weight_decay: set[str] = set(getattr(model, "no_weight_decay", set)())
    with _all_requiring_grad(model) if include_frozen else contextlib.nullcontext():
        if layer_decay is not None:
            groups = param_groups_layer_decay(
                model, weight_decay=spec.weight_decay, layer_decay=layer_decay, no_weight_decay_list=no_weight_decay
            )
        else:
            groups = param_groups_weight_decay(
                model, weight_decay=spec.weight_decay, no_weight_decay_list=no_weight_decay
            )

    def split(g: dict[str, Any], role: str) -> dict[str, Any] | None:
        members = [p for p in g["params"] if (id(p) in head) == (role == HEAD)]
        if not members:
            return None
        scale = 1.0 if role == HEAD else float(g.get("lr_scale", 1.0)) * backbone_lr_mult
        keys = {k: v for k, v in g.items() if k != "params"}
        lrs = {"lr_scale": scale, "initial_lr": spec.lr_value(), "lr": spec.lr_value() * scale}
        return {**keys, "params": members, "group": role, **lrs}

    split_groups = [s for role in (HEAD, BACKBONE) for g in groups if (s := split(g, role)) is not None]
    return create_optimizer_v2(split_groups, **kwargs)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr of each role (``"head"``, ``"backbone"``) of a ``create_optimizer`` optimizer.

    With layer decay the backbone's groups differ; its largest lr (the top layer's) is given.
    Groups without a ``"group"`` key count as ``"backbone"``.
    """
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        role = g.get("group", BACKBONE)
        out[role] = max(out.get(role, 0.0), float(g["lr"]))
    return out


# --------------------------------------------------------------------------- schedulers timm lacks


class _PrefixWarmupScheduler(Scheduler):
    """A per-epoch ``Scheduler`` with timm's prefix warm-up: linear from ``warmup_lr_init`` to each
    group's base lr over ``warmup_t`` epochs, then ``_after_warmup(t, base)`` with ``t`` counted from
    the end of the warm-up (timm's ``warmup_prefix=True``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_t: int = 0, warmup_lr_init: float = 0.0) -> None:
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=True)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if warmup_t:
            self.update_groups(warmup_lr_init)

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * (v - self.warmup_lr_init) / self.warmup_t for v in self.base_values]
        return [self._after_warmup(t - self.warmup_t, v) for v in self.base_values]

    @abc.abstractmethod
    def _after_warmup(self, t: int, base: float) -> float:
        """The lr ``t`` epochs after warm-up for a group whose base lr is ``base``."""


class InverseTimeLRScheduler(_PrefixWarmupScheduler):
    """``base / (1 + decay * t)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, decay: float, **warmup: Any) -> None:
        self.decay = decay
        super().__init__(optimizer, **warmup)

    def _after_warmup(self, t: int, base: float) -> float:
        return base / (1.0 + self.decay * t)


class OneCycleLRScheduler(_PrefixWarmupScheduler):
    """One cycle over ``total_t`` epochs: linear from ``base / div_factor`` up to ``base`` at epoch
    ``round(pct_start * total_t) - 1`` (torch ``OneCycleLR``'s peak, on a whole epoch), then cosine
    down to ``lr_min`` at the last epoch ``total_t - 1``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_t: int,
        pct_start: float,
        div_factor: float,
        lr_min: float,
        **warmup: Any,
    ) -> None:
        self.total_t = total_t
        self.peak_t = max(math.floor(pct_start * total_t + 0.5) - 1, 0)
        self.div_factor = div_factor
        self.lr_min = lr_min
        super().__init__(optimizer, **warmup)

    def _after_warmup(self, t: int, base: float) -> float:
        if t <= self.peak_t:
            start = base / self.div_factor
            return base if self.peak_t == 0 else start + (base - start) * t / self.peak_t
        span = self.total_t - 1 - self.peak_t  # 0 when the rise fills the run: t is past its end
        frac = min((t - self.peak_t) / span, 1.0) if span > 0 else 1.0
        return self.lr_min + 0.5 * (base - self.lr_min) * (1.0 + math.cos(math.pi * frac))


class CyclicCosineLRScheduler(_PrefixWarmupScheduler):
    """Cosine from each group's base lr towards ``lr_min`` within each cycle, restarting at the next.

    ``cycle_lengths`` (epochs, may be fractional) follow each other from the end of the warm-up;
    after the last cycle the lr stays at ``lr_min``. Within a cycle of length ``L`` starting at
    ``s`` the lr is ``lr_min + (base - lr_min) (1 + cos(pi (t - s) / L)) / 2``, timm's
    ``CosineLRScheduler`` formula. That class is not used because it needs every cycle ``cycle_mul``
    times the previous one (a snapshot ensemble's cycles split the epochs as evenly as possible)
    and finds the cycle with a floating-point log that misplaces boundaries (cycles of 1, 10, 100
    epochs: epoch 111 lands in the third cycle).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, cycle_lengths: Sequence[float], lr_min: float, **warmup: Any
    ) -> None:
        if not cycle_lengths or min(cycle_lengths) <= 0:
            raise ValueError(f"cycle lengths must be positive, got {list(cycle_lengths)}")
        self.cycle_lengths = [float(x) for x in cycle_lengths]
        self.lr_min = lr_min
        super().__init__(optimizer, **warmup)

    def _after_warmup(self, t: int, base: float) -> float:
        start = 0.0
        for length in self.cycle_lengths:
            if t < start + length:
                return self.lr_min + 0.5 * (base - self.lr_min) * (1.0 + math.cos(math.pi * (t - start) / length))
            start += length
        return self.lr_min


class LossPlateauLRScheduler(_PrefixWarmupScheduler):
    """``base x decay_rate ** drops`` (floored at ``lr_min``): one more drop each time the validation
    loss has not improved for more than ``patience_t`` epochs in a row.

    The rule is torch's ``ReduceLROnPlateau(mode="min", threshold=1e-4)`` (which timm's
    ``PlateauLRScheduler`` wraps): a loss is better when below ``best x (1 - 1e-4)``; after a drop
    the count of bad epochs restarts. Losses of warm-up epochs are ignored. timm's class is not used:
    it is deprecated, saves only part of its state (a resumed run would not continue exactly), and
    with no warm-up sets the lr of epoch 0 to ``warmup_lr``.

    ``step(epoch, metric)`` takes ``metric`` as the loss of epoch ``epoch - 1``; each epoch's loss is
    counted once, however often ``step`` is called for it.
    """

    threshold = 1e-4

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        decay_rate: float,
        patience_t: int,
        lr_min: float,
        **warmup: Any,
    ) -> None:
        self.decay_rate = decay_rate
        self.patience_t = patience_t
        self.lr_min = lr_min
        self.best: float | None = None
        self.bad_epochs = 0
        self.drops = 0
        self.counted_epoch = -1  # the last epoch whose loss was counted
        super().__init__(optimizer, **warmup)

    def step(self, epoch: int, metric: float | None = None) -> None:
        seen = epoch - 1
        if metric is not None and seen >= self.warmup_t and seen > self.counted_epoch:
            self.counted_epoch = seen
            metric = float(metric)
            if self.best is None or metric < self.best * (1.0 - self.threshold):
                self.best, self.bad_epochs = metric, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.patience_t:
                    self.drops += 1
                    self.bad_epochs = 0
        super().step(epoch, metric)

    def _after_warmup(self, t: int, base: float) -> float:
        return max(base * self.decay_rate**self.drops, min(self.lr_min, base))


# --------------------------------------------------------------------------- the schedule factory

_Builder = Callable[[torch.optim.Optimizer, ScheduleSpec, int, int], Scheduler]


def _timm(sched: str, **extra: Any) -> _Builder:
    # timm's factory under ``sched``; ``extra`` values may be functions of the spec.
    def build(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, epochs: int, warmup: int) -> Scheduler:
        kwargs = {k: (v(spec) if callable(v) else v) for k, v in extra.items()}
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=sched,
            num_epochs=epochs - warmup,
            warmup_epochs=warmup,
            warmup_lr=spec.warmup_lr,
            warmup_prefix=True,
            min_lr=spec.min_lr,
            **kwargs,
        )
        if scheduler is None:  # timm returns None for names it does not know
            raise UnknownNameError("schedule", spec.name, list(SCHEDULES))
        return scheduler

    return build


def _warm(spec: ScheduleSpec, warmup: int) -> dict[str, Any]:
    return {"warmup_t": warmup, "warmup_lr_init": spec.warmup_lr}


def _restart_lengths(first: float, mult: float, total: int) -> list[float]:
    lengths = [float(first)]
    while sum(lengths) < total:
        lengths.append(lengths[-1] * mult)
    return lengths


#: How each name of ``spec.SCHEDULES`` is built: ``(optimizer, spec, epochs, warmup) -> Scheduler``.
SCHEDULE_BUILDERS: dict[str, _Builder] = {
    "constant": _timm("constant"),
    "step": _timm("step", decay_epochs=lambda s: s.step_epochs, decay_rate=lambda s: s.gamma),
    "exponential": _timm("step", decay_epochs=1, decay_rate=lambda s: s.gamma),
    # timm drops at milestone m when t + 1 >= m (its historical convention); zoofit's milestone m
    # drops at t == m, like step_epochs and torch's MultiStepLR.
    "multistep": _timm(
        "multistep", decay_milestones=lambda s: [m + 1 for m in s.milestones], decay_rate=lambda s: s.gamma
    ),
    "cosine": _timm("cosine"),
    "inverse_time": lambda opt, spec, epochs, warmup: InverseTimeLRScheduler(
        opt, decay=spec.decay, **_warm(spec, warmup)
    ),
    "cosine_restarts": lambda opt, spec, epochs, warmup: CyclicCosineLRScheduler(
        opt,
        cycle_lengths=_restart_lengths(spec.cycle_epochs, spec.cycle_mult, epochs - warmup),
        lr_min=spec.min_lr,
        **_warm(spec, warmup),
    ),
    "one_cycle": lambda opt, spec, epochs, warmup: OneCycleLRScheduler(
        opt,
        total_t=epochs - warmup,
        pct_start=spec.pct_start,
        div_factor=spec.div_factor,
        lr_min=spec.min_lr,
        **_warm(spec, warmup),
    ),
    "plateau": lambda opt, spec, epochs, warmup: LossPlateauLRScheduler(
        opt, decay_rate=spec.gamma, patience_t=spec.plateau_patience, lr_min=spec.min_lr, **_warm(spec, warmup)
    ),
}


def _warmup_epochs(spec: ScheduleSpec, epochs: int) -> int:
    if epochs < 1:
        raise ValueError(f"a schedule needs at least one epoch, got {epochs}")
    if spec.name == "one_cycle":
        return 0  # its rise from lr / div_factor is the warm-up
    # Warm-up counts within the epochs and leaves at least one epoch after it.
    return min(spec.warmup_epochs, epochs - 1)


def create_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, *, epochs: int) -> Scheduler:
    """Learning-rate scheduler of ``spec`` over ``epochs`` epochs, stepped per epoch.

    Linear warm-up from ``warmup_lr`` to each group's base lr over ``warmup_epochs`` (counted within
    ``epochs``, shortened to leave at least one epoch after it), then with ``t`` the epochs since
    warm-up and ``lr`` the base lr:

    * ``constant``: ``lr``;
    * ``step``: ``lr x gamma ** (t // step_epochs)``;
    * ``multistep``: ``lr x gamma ** (number of milestones <= t)``;
    * ``exponential``: ``lr x gamma ** t``;
    * ``inverse_time``: ``lr / (1 + decay t)``;
    * ``cosine``: ``min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2`` with ``T = epochs - warmup``
      (timm's: the last epoch is one step short of ``min_lr``);
    * ``cosine_restarts``: the same within cycles of ``cycle_epochs``, ``cycle_epochs x cycle_mult``,
      ... epochs, back at ``lr`` at the start of each;
    * ``one_cycle``: linear from ``lr / div_factor`` up to ``lr`` at ``t = round(pct_start T) - 1``,
      then cosine down to exactly ``min_lr`` at the last epoch;
    * ``plateau``: ``lr x gamma ** drops`` (not below ``min_lr``), one more drop each time the
      validation loss has not improved for more than ``plateau_patience`` epochs in a row
      (torch's ``ReduceLROnPlateau`` rule; ``plateau_patience=0`` drops after every epoch without
      improvement).

    The contract: ``scheduler.step(epoch, metric)`` at the start of each 0-based epoch, ``metric``
    being the previous epoch's validation loss (None at epoch 0; only ``plateau`` uses it), sets
    every param group's ``"lr"`` to the schedule of its ``"initial_lr"`` times its ``"lr_scale"``
    (when present). ``state_dict()`` is JSON-able; loaded into a scheduler freshly built for the
    same optimizer it continues the run exactly.

    Args:
        optimizer: the optimizer whose lr is scheduled (each group's ``initial_lr``, else its current
            lr, is its base lr).
        spec: the job's schedule settings.
        epochs: total training epochs, warm-up included.

    Returns:
        A ``timm.scheduler.Scheduler``.

    Raises:
        UnknownNameError: unknown schedule name.
        ValueError: ``epochs`` < 1.
    """
    builder = SCHEDULE_BUILDERS.get(spec.name)
    if builder is None or spec.name not in SCHEDULES:
        raise UnknownNameError("schedule", spec.name, list(SCHEDULES))
    return builder(optimizer, spec, epochs, _warmup_epochs(spec, epochs))


def cycle_ends(epochs: int, cycles: int) -> list[int]:
    """Last epoch (0-based) of each of ``cycles`` cycles splitting ``epochs`` as evenly as possible.

    Longer cycles (by one epoch) come first; the last cycle ends at ``epochs - 1``.

    Raises:
        ValueError: not ``1 <= cycles <= epochs``.
    """
    if not 1 <= cycles <= epochs:
        raise ValueError(f"need 1 <= cycles <= epochs, got {cycles} cycles over {epochs} epochs")
    size, extra = divmod(epochs, cycles)
    ends, end = [], -1
    for k in range(cycles):
        end += size + (1 if k < extra else 0)
        ends.append(end)
    return ends


def create_snapshot_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, *, epochs: int, cycles: int
) -> CyclicCosineLRScheduler:
    """Cyclic cosine for a snapshot ensemble: ``cycles`` cycles ending at ``cycle_ends(epochs, cycles)``.

    Each cycle starts at the base lr and decays towards ``min_lr`` (cosine, as ``create_scheduler``'s
    ``cosine``); the weights at each cycle's last epoch are a member. ``spec.name`` is not used;
    ``warmup_epochs``/``warmup_lr`` warm up the first cycle only (shortened to leave at least one
    epoch of that cycle after it). Same contract as ``create_scheduler``.

    Raises:
        ValueError: not ``1 <= cycles <= epochs``.
    """
    ends = cycle_ends(epochs, cycles)
    warmup = min(spec.warmup_epochs, ends[0])
    starts = [warmup] + [e + 1 for e in ends[:-1]]
    return CyclicCosineLRScheduler(
        optimizer,
        cycle_lengths=[e + 1 - s for s, e in zip(starts, ends, strict=True)],
        lr_min=spec.min_lr,
        **_warm(spec, warmup),
    )


def lr_at_epochs(
    spec: ScheduleSpec,
    epochs: int,
    base_lr: float,
    metrics: Sequence[float | None] | None = None,
    *,
    cycles: int | None = None,
) -> list[float]:
    """The lr of each epoch (0-based) that ``create_scheduler`` produces for ``base_lr``.

    Args:
        spec: schedule settings.
        epochs: total epochs.
        base_lr: the optimizer's lr.
        metrics: validation loss after each epoch (``metrics[e]`` is passed to the step of epoch
            ``e + 1``); at least ``epochs - 1`` of them. Only ``plateau`` reads them; without them
            the plateau schedule never drops.
        cycles: a snapshot ensemble's cycles: the lrs of ``create_snapshot_scheduler`` instead.

    Returns:
        ``epochs`` learning rates.
    """
    if metrics is not None and len(metrics) < epochs - 1:
        raise ValueError(f"need a validation loss for each of the first {epochs - 1} epochs, got {len(metrics)}")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    if cycles is None:
        scheduler: Scheduler = create_scheduler(optimizer, spec, epochs=epochs)
    else:
        scheduler = create_snapshot_scheduler(optimizer, spec, epochs=epochs, cycles=cycles)
    lrs = []
    for epoch in range(epochs):
        scheduler.step(epoch, metrics[epoch - 1] if metrics is not None and epoch > 0 else None)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    return lrs
