"""Which part of a backbone keeps its pretrained weights.

Vocabulary after Lightning's ``BaseFinetuning.freeze(modules, train_bn=...)``: frozen
parameters get ``requires_grad=False``; BatchNorm layers in the frozen part also stay in
eval mode (unless ``train_bn``) so their running statistics do not drift while the rest
trains. ``model.train()`` would switch them back, so training calls
``set_train_mode(model, report)`` instead.

Stages come from timm's own grouping, ``model.group_matcher(coarse=True)``: the stem is
group 0, then one group per block stage; the group holding the classifier always trains.

The transfer policy lives here too: ``resolve_transfer`` picks the strategy for ``auto`` from the
training images per class, and ``gradual_freeze`` says how deep a gradual-unfreezing run is frozen
in a given epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .spec import FreezeSpec, check_name
from .zoo import count_parameters

FREEZE_MODES = ("none", "linear_probe", "first_n")


@dataclass
class FreezeReport:
    """What ``apply_freeze`` did.

    Attributes:
        mode: the freeze mode applied.
        frozen_groups: names of the frozen parameter groups (module prefixes, e.g. ``conv_stem+bn1``,
            ``blocks.0``), in model order.
        trainable_params: parameters left trainable.
        total_params: all parameters.
        train_bn: whether BatchNorm in the frozen part still updates its statistics.
        frozen_bn: module names of the BatchNorm layers kept in eval mode during training.
    """

    mode: str
    frozen_groups: list[str]
    trainable_params: int
    total_params: int
    train_bn: bool = False
    frozen_bn: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """timm's coarse parameter groups of ``model``, in order (stem first, head last).

    Args:
        model: a timm model (anything with ``group_matcher``).

    Returns:
        One list of parameter names per group.
    """
    groups = group_parameters(model, cast(Any, model).group_matcher(coarse=True))
    return [list(groups[k]) for k in sorted(groups)]


def _group_label(names: list[str], owner: dict[str, int], gid: int) -> str:
    # Shortest dotted prefixes whose parameters all belong to this group: "blocks.0", "conv_stem+bn1".
    labels: list[str] = []
    for pname in names:
        parts = pname.split(".")
        label = pname
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if all(g == gid for n, g in owner.items() if n == prefix or n.startswith(prefix + ".")):
                label = prefix
                break
        if label not in labels:
            labels.append(label)
    return "+".join(labels)


def group_labels(model: nn.Module) -> list[str]:
    """Human names of ``parameter_groups(model)``, e.g. ``['conv_stem+bn1', 'blocks.0', ...]``."""
    groups = parameter_groups(model)
    owner = {n: gid for gid, names in enumerate(groups) for n in names}
    return [_group_label(names, owner, gid) for gid, names in enumerate(groups)]


def _frozen_batchnorms(model: nn.Module) -> list[str]:
    # A BatchNorm belongs to the frozen part when none of its (affine) parameters trains.
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                names.append(mname)
    return names


def apply_freeze(model: nn.Module, *, mode: str, stages: int, train_bn: bool) -> FreezeReport:
    """Freeze part of ``model`` in place.

    Args:
        model: a timm model with a classifier (``get_classifier``) and ``group_matcher``.
        mode: ``none`` (train everything), ``linear_probe`` (train only ``model.get_classifier()``)
            or ``first_n`` (freeze the first ``stages`` groups of ``parameter_groups``; the stem is
            group 0; the group holding the classifier is never frozen).
        stages: number of frozen groups for ``first_n``.
        train_bn: let BatchNorm layers in the frozen part keep updating running statistics.

    Returns:
        A ``FreezeReport``; pass it to ``set_train_mode`` at the start of every training epoch.

    Raises:
        UnknownNameError: unknown ``mode``.
    """
    check_name("freeze mode", mode, FREEZE_MODES)
    if stages < 0:
        raise ValueError(f"stages must be >= 0, got {stages}")
    for p in model.parameters():
        p.requires_grad_(True)

    labels = group_labels(model)
    groups = parameter_groups(model)
    head = {id(p) for p in cast(Any, model).get_classifier().parameters()}
    params = dict(model.named_parameters())
    frozen: list[int] = []
    if mode == "linear_probe":
        for p in model.parameters():
            if id(p) not in head:
                p.requires_grad_(False)
        frozen = [gid for gid, names in enumerate(groups) if not any(id(params[n]) in head for n in names)]
    elif mode == "first_n":
        for gid, names in enumerate(groups[:stages]):
            if any(id(params[n]) in head for n in names):
                break
            for n in names:
                params[n].requires_grad_(False)
            frozen.append(gid)

    trainable, total = count_parameters(model)
    return FreezeReport(
        mode=mode,
        frozen_groups=[labels[g] for g in frozen],
        trainable_params=trainable,
        total_params=total,
        train_bn=train_bn,
        frozen_bn=[] if train_bn else _frozen_batchnorms(model),
    )


def set_train_mode(model: nn.Module, frozen: FreezeReport | Iterable[str]) -> nn.Module:
    """``model.train()``, then put the frozen part's BatchNorm layers back into eval mode.

    Args:
        model: the model ``apply_freeze`` was applied to.
        frozen: its ``FreezeReport``, or the module names of BatchNorm layers to keep in eval.

    Returns:
        ``model``.
    """
    names = set(frozen.frozen_bn if isinstance(frozen, FreezeReport) else frozen)
    model.train()
    if names:
        for mname, module in model.named_modules():
            if mname in names:
                module.eval()
    return model


# --------------------------------------------------------------------------- transfer policy

# The lecture's rule for transfer learning, in training images per class: with very little data
# train only a linear classifier on the pretrained features; with more, fine-tune the top of the
# network; with a lot, fine-tune all of it; whatever is fine-tuned trains at a lower lr than the
# new head (the pretrained weights are already good).
AUTO_LINEAR_BELOW = 40
AUTO_PARTIAL_BELOW = 250
AUTO_TOP_GROUPS = 2
AUTO_BACKBONE_LR_MULT = 0.1


def resolve_transfer(freeze: FreezeSpec, per_class: float, n_groups: int) -> tuple[FreezeSpec, str]:
    """The concrete transfer strategy for ``freeze.mode == 'auto'`` (others pass through).

    Args:
        freeze: the job's transfer settings.
        per_class: mean training images per class.
        n_groups: the model's parameter groups (``parameter_groups``), head group included.

    Returns:
        The strategy to run and a sentence saying why.
    """
    if freeze.mode != "auto":
        return freeze, f"as requested: {freeze.mode}"
    backbone_groups = n_groups - 1
    if per_class < AUTO_LINEAR_BELOW:
        chosen = freeze.model_copy(update={"mode": "linear_probe"})
        why = (
            f"{per_class:.0f} training images per class (< {AUTO_LINEAR_BELOW}): too little data to fine-tune "
            "without overfitting, so only the new classifier trains on the pretrained features"
        )
    elif per_class < AUTO_PARTIAL_BELOW:
        stages = max(backbone_groups - AUTO_TOP_GROUPS, 0)
        chosen = freeze.model_copy(
            update={
                "mode": "first_n",
                "stages": stages,
                "backbone_lr_mult": min(freeze.backbone_lr_mult, AUTO_BACKBONE_LR_MULT),
            }
        )
        why = (
            f"{per_class:.0f} training images per class ({AUTO_LINEAR_BELOW}-{AUTO_PARTIAL_BELOW - 1}): "
            f"fine-tune the top {AUTO_TOP_GROUPS} stages (freeze the first {stages} of {backbone_groups}) at "
            f"{chosen.backbone_lr_mult:g} x lr, the new classifier at lr"
        )
    else:
        chosen = freeze.model_copy(
            update={"mode": "none", "backbone_lr_mult": min(freeze.backbone_lr_mult, AUTO_BACKBONE_LR_MULT)}
        )
        why = (
            f"{per_class:.0f} training images per class (>= {AUTO_PARTIAL_BELOW}): enough data to fine-tune "
            f"every layer, the backbone at {chosen.backbone_lr_mult:g} x lr"
        )
    return chosen, why


def gradual_freeze(freeze: FreezeSpec, epoch: int, n_groups: int) -> tuple[str, int]:
    """``(mode, stages)`` for ``apply_freeze`` in ``epoch`` of a gradual-unfreezing run.

    Epochs ``0..k-1`` train the classifier only; then one more backbone group trains, from the top,
    every ``k = unfreeze_every`` epochs, until only the first ``freeze.stages`` groups stay frozen.
    """
    unfrozen = epoch // freeze.unfreeze_every
    if unfrozen == 0:
        return "linear_probe", n_groups - 1
    return "first_n", max(freeze.stages, n_groups - 1 - unfrozen)
