"""One ensemble member's setup: its model, transfer strategy, optimizer, schedule and regularizers.

``setup_member`` builds a ``MemberSetup`` from the recipe, the one object that the epoch loop
(``models.training``) and the L-BFGS fit (``models.lbfgs.train_lbfgs_member``) work on.
``RunContext`` is what either needs from the run around it (data on the device, validation,
callbacks); ``Best`` keeps the best weights so far; ``finished_member`` turns them into a
``TrainedMember``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from .checkpoint import TrainState
from .ensemble import polyak
from .freezing import FreezeReport, apply_freeze, gradual_freeze, parameter_groups, resolve_transfer
from .heads import HeadConfig, active_drop_paths, batch_mixer, create_classifier, train_criterion
from .optim import create_optimizer, create_scheduler, create_snapshot_scheduler
from .prefix import CachePlan, FeatureCache, Step, frozen_prefix, model_steps
from .results import TrainedMember
from .spec import EpochRecord, FreezeSpec, TrainSpec
from .transforms import augment_transform
from .zoo import Preprocess, count_parameters, preprocess_for


class RunContext(Protocol):
    """What a member's training needs from its run (``models.training._Run`` provides it)."""

    spec: TrainSpec
    device: torch.device
    cuda: bool
    amp_dtype: torch.dtype | None
    num_classes: int
    per_class: float
    train_idx: np.ndarray
    train_labels: torch.Tensor
    history: list[EpochRecord]
    members: list[TrainedMember]
    member_probs: list[np.ndarray]
    on_epoch: Callable[[EpochRecord], None] | None
    log: Callable[[str], None]

    def check_stop(self) -> None: ...

    def evaluate(
        self, model: nn.Module, pre: Preprocess, steps: list[Step] | None = None,
        cache: FeatureCache | None = None, cached: int = 0,
    ) -> tuple[float, float, np.ndarray]: ...

    def cache_for(
        self, steps: list[Step] | None, n: int, fs: FreezeSpec, pre: Preprocess, augment: Any, seed: int,
        share: tuple[Any, ...] | None = None,
    ) -> tuple[FeatureCache | None, CachePlan]: ...


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s weights that shares no memory with it."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class Best:
    """Best weights so far by the monitored metric, over raw and (when served) EMA weights."""

    monitor: str
    score: tuple[float, float] | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    acc: float = 0.0
    loss: float = math.inf
    probs: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))
    kind: str = "raw"
    since: int = 0

    def key(self, acc: float, loss: float) -> tuple[float, float]:
        return (acc, -loss) if self.monitor == "val_acc" else (-loss, acc)

    def offer(self, epoch: int, kind: str, acc: float, loss: float, probs: np.ndarray, model: nn.Module) -> bool:
        score = self.key(acc, loss)
        if self.score is not None and score <= self.score:
            return False
        self.score, self.epoch, self.kind = score, epoch, kind
        self.acc, self.loss, self.probs = acc, loss, probs
        self.state = state_copy(model)
        return True

    def restore(self, state: TrainState) -> None:
        """Continue from a checkpoint's best weights and early-stopping counter."""
        self.state, self.epoch, self.kind = state.best_state, state.best_epoch, state.best_kind
        self.since = state.since_best
        self.acc, self.loss, self.probs = state.best_acc, state.best_loss, state.best_probs
        self.score = self.key(self.acc, self.loss)


@dataclass
class MemberSetup:
    """Everything one member trains with.

    Attributes:
        index: ensemble index (0-based; a snapshot ensemble trains one run, index 0).
        backbone: timm model name.
        seed: ``spec.seed + index``.
        model: the classifier on the run's device.
        pre: its input preprocessing at the shared image size.
        head: the head options.
        transfer: the concrete transfer strategy (``auto`` resolved).
        n_groups: the model's parameter groups, head included.
        freeze: what is frozen right now (gradual unfreezing changes it between epochs).
        steps: the model as a sequence of steps (None for a family without them).
        n_cache: leading steps whose output the feature cache holds.
        cache: the frozen-prefix feature cache, or None.
        rng: the member's batch-order generator.
        optimizer: None for L-BFGS (it has its own).
        scheduler: the learning-rate schedule, None for L-BFGS.
        head_group: the optimizer group holding the classifier (its lr is the one reported).
        scaler: the fp16 ``GradScaler`` on a GPU without bf16, else None.
        ema: the Polyak average (``ModelEmaV3``) when ``ensemble.ema``, else None.
        augment: the training transform, or None.
        mixer: mixup/cutmix, or None.
        criterion: the training loss.
        applied: what the run did, as the report's ``applied.members[i]``.
        shared_cache: ``cache`` is the run's, shared with other members (the run closes it).
    """

    index: int
    backbone: str
    seed: int
    model: nn.Module
    pre: Preprocess
    head: HeadConfig
    transfer: FreezeSpec
    n_groups: int
    freeze: FreezeReport
    steps: list[Step] | None
    n_cache: int
    cache: FeatureCache | None
    rng: np.random.Generator
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    head_group: int
    scaler: Any
    ema: Any
    augment: Any
    mixer: Any
    criterion: Any
    applied: dict[str, Any]
    shared_cache: bool = False

    def close(self) -> None:
        """Release the feature cache (memory, or its spill files), unless the run shares it."""
        if self.cache is not None and not self.shared_cache:
            self.cache.close()


def setup_member(
    ctx: RunContext, i: int, backbone: str, shared: Preprocess, resume_weights: dict[str, torch.Tensor] | None
) -> MemberSetup:
    """Build member ``i`` as the recipe says, seeded, with its cache built (nothing trained yet).

    Args:
        ctx: the run.
        i: ensemble index.
        backbone: timm model name.
        shared: the ensemble's preprocessing (image size and interpolation).
        resume_weights: the checkpoint's weights of this member: loaded at once (nothing is downloaded),
            before its feature cache is built.
    """
    spec = ctx.spec
    seed = spec.seed + i
    torch.manual_seed(seed)
    np.random.seed(seed)  # timm's Mixup draws from numpy's global generator
    rng = np.random.default_rng(seed)
    pre = preprocess_for(backbone, shared.image_size)
    pre = Preprocess(pre.mean, pre.std, shared.interpolation, shared.image_size)
    head = HeadConfig.from_spec(spec)
    model = create_classifier(
        backbone,
        weights="none" if resume_weights is not None else spec.weights,
        num_classes=ctx.num_classes,
        head=head,
        image_size=shared.image_size,
    )
    if resume_weights is not None:
        # The checkpoint's weights go in now, before the frozen prefix's features are cached below
        # (they hold the pretrained prefix; the empty architecture's random one must not be cached).
        model.load_state_dict(resume_weights)
    n_groups = len(parameter_groups(model))
    fs, why = resolve_transfer(spec.freeze, ctx.per_class, n_groups)
    gradual = fs.mode == "gradual"
    # The optimizer holds every parameter that ever trains; gradual unfreezing only flips
    # requires_grad (a parameter without a gradient is skipped by every torch optimizer).
    freeze = apply_freeze(model, mode="first_n" if gradual else fs.mode, stages=fs.stages, train_bn=fs.train_bn)
    steps = model_steps(model)
    n_cache = frozen_prefix(steps) if steps is not None else 0
    optimizer: torch.optim.Optimizer | None = None
    if spec.optimizer.name != "lbfgs":
        optimizer = create_optimizer(
            model, spec.optimizer, backbone_lr_mult=fs.backbone_lr_mult, layer_decay=fs.layer_decay
        )
    if gradual:
        mode, stages = gradual_freeze(fs, 0, n_groups)
        freeze = apply_freeze(model, mode=mode, stages=stages, train_bn=fs.train_bn)
    # channels_last on the CPU too: the same arithmetic, and oneDNN's convolutions run faster in it (a
    # whole job 1.43-1.48x on the 2-core machine: BENCHMARKS.md, benchmarks/memory_format.py).
    model.to(ctx.device).to(memory_format=torch.channels_last)
    head_group, scheduler = _head_group_and_schedule(model, optimizer, spec)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp_dtype == torch.float16 else None
    ema = polyak(model, spec.ensemble.ema_decay) if spec.ensemble.ema else None
    augment = augment_transform(spec.augment, pre) if spec.augment.enabled else None
    mixer = batch_mixer(spec.augment, ctx.num_classes, spec.label_smoothing)
    trainable, total = count_parameters(model)
    ctx.log(
        f"member {i + 1}/{spec.ensemble.members}: {backbone} ({spec.weights} weights, seed {seed}), "
        f"{trainable:,}/{total:,} parameters trainable, frozen: {', '.join(freeze.frozen_groups) or '-'}"
        + (f"; auto: {why}" if spec.freeze.mode == "auto" else "")
    )
    # Frozen steps run in eval mode in every path (BatchNorm statistics fixed, no drop-path).
    model.eval()
    # Members that see the same frozen prefix of the same pretrained weights get the same features: one
    # cache serves them all (built once, not once per member). Augmented views too: drawn once, under the
    # job's seed (a resumed run draws the same), each member cycling them from its own offset
    # (models.training). Same-run comparison: as accurate as a member's own views, and up to 1.16x
    # faster (BENCHMARKS.md, "Shared augmented views").
    share = ((backbone, n_cache, pre, spec.weights, spec.augment if augment is not None else None)
             if spec.weights != "none" else None)
    cache, plan = ctx.cache_for(steps, n_cache, fs, pre, augment, seed if share is None else spec.seed, share)
    member = MemberSetup(
        index=i,
        backbone=backbone,
        seed=seed,
        model=model,
        pre=pre,
        head=head,
        transfer=fs,
        n_groups=n_groups,
        freeze=freeze,
        steps=steps,
        n_cache=n_cache,
        cache=cache,
        rng=rng,
        optimizer=optimizer,
        scheduler=scheduler,
        head_group=head_group,
        scaler=scaler,
        ema=ema,
        augment=augment,
        mixer=mixer,
        criterion=train_criterion(spec),
        applied={},
        shared_cache=share is not None,
    )
    member.applied = _applied(ctx, member, why, plan)
    return member


def _head_group_and_schedule(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, spec: TrainSpec
) -> tuple[int, Any]:
    """The optimizer group holding the classifier, and the lr schedule (None for L-BFGS)."""
    if optimizer is None:
        return 0, None
    head_params = {id(p) for p in cast(Any, model).get_classifier().parameters()}
    head_group = next(
        (g for g, group in enumerate(optimizer.param_groups) if any(id(p) in head_params for p in group["params"])),
        0,
    )
    if spec.ensemble.snapshot:
        return head_group, create_snapshot_scheduler(
            optimizer, spec.schedule, epochs=spec.epochs, cycles=spec.ensemble.members
        )
    return head_group, create_scheduler(optimizer, spec.schedule, epochs=spec.epochs)


def rebuild_optimizer(ctx: RunContext, m: MemberSetup) -> None:
    """A fresh optimizer and schedule for ``m`` from ``ctx.spec`` (after the lr finder set the lr)."""
    spec, fs = ctx.spec, m.transfer
    # Gradual unfreezing: the optimizer holds every parameter that ever trains (see setup_member).
    flags = [p.requires_grad for p in m.model.parameters()]
    if fs.mode == "gradual":
        apply_freeze(m.model, mode="first_n", stages=fs.stages, train_bn=fs.train_bn)
    m.optimizer = create_optimizer(
        m.model, spec.optimizer, backbone_lr_mult=fs.backbone_lr_mult, layer_decay=fs.layer_decay
    )
    for p, flag in zip(m.model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    m.head_group, m.scheduler = _head_group_and_schedule(m.model, m.optimizer, spec)
    m.applied["param_groups"] = [
        {"lr": float(g["lr"]), "params": len(g["params"]), "weight_decay": float(g.get("weight_decay", 0))}
        for g in m.optimizer.param_groups
    ]


def _applied(ctx: RunContext, m: MemberSetup, why: str, plan: CachePlan) -> dict[str, Any]:
    """What the report's ``applied.members[i]`` says before training (the loop adds its outcome)."""
    spec, fs = ctx.spec, m.transfer
    applied: dict[str, Any] = {
        "member": m.index,
        "backbone": m.backbone,
        "transfer": {
            "mode": fs.mode,
            "requested": spec.freeze.mode,
            "stages": fs.stages,
            "why": why,
            "backbone_lr_mult": fs.backbone_lr_mult,
            "layer_decay": fs.layer_decay,
            "train_bn": fs.train_bn,
        },
        "cache": plan.to_dict(),
        "optimizer": spec.optimizer.name,
        "param_groups": [
            {"lr": float(g["lr"]), "params": len(g["params"]), "weight_decay": float(g.get("weight_decay", 0))}
            for g in (m.optimizer.param_groups if m.optimizer is not None else [])
        ],
        "schedule": "snapshot cyclic cosine" if spec.ensemble.snapshot else spec.schedule.name,
        "head": m.head.to_dict(),
        "augment": None if m.augment is None else repr(m.augment),
        "mixup": m.mixer is not None,
        "label_smoothing": spec.label_smoothing,
        "ema": spec.ensemble.ema,
    }
    if spec.drop_path > 0:
        trained = [mod for st in m.steps[m.n_cache :] for mod in st.modules] if m.steps else [m.model]
        active = active_drop_paths(trained)
        applied["drop_path"] = {"rate": spec.drop_path, "active_blocks": active}
        if active == 0:
            applied["drop_path"]["note"] = (
                "no residual block trains, so stochastic depth has nothing to drop (frozen blocks run in eval)"
            )
            ctx.log(f"member {m.index + 1}: drop_path {spec.drop_path} has no effect: {applied['drop_path']['note']}")
    return applied


def finished_member(
    ctx: RunContext, m: MemberSetup, state: dict[str, torch.Tensor], best: Best, epochs_run: int, served: str
) -> TrainedMember:
    """The trained member with the weights ``state`` (its best epoch's, an EMA's or a snapshot's)."""
    return TrainedMember(
        backbone=m.backbone,
        seed=m.seed,
        state_dict=state,
        num_classes=ctx.num_classes,
        drop_rate=m.head.drop_rate,
        preprocess=m.pre,
        best_epoch=best.epoch,
        epochs_run=epochs_run,
        epochs_planned=ctx.spec.epochs,
        val_acc=best.acc,
        val_loss=best.loss,
        freeze=m.freeze.to_dict(),
        head=m.head.to_dict(),
        served=served,
    )
