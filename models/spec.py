"""The training recipe: what a fine-tuning job asks for.

This module is deliberately free of torch and timm imports so the API process can
validate a job without loading the ML stack. The registries below name what the
engine supports; the engine (``models.zoo``, ``models.optim``, ...) turns them into
real objects and has tests that parametrize over these same registries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = valid
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class BackboneInfo:
    """One backbone of the zoo.

    Attributes:
        name: timm model name.
        bundled: whether ImageNet weights ship inside an installed package (offline).
        hub: whether timm knows a pretrained download for it.
        description: one line for humans.
    """

    name: str
    bundled: bool = False
    hub: bool = True
    description: str = ""


BACKBONES: dict[str, BackboneInfo] = {
    b.name: b
    for b in (
        BackboneInfo("tf_efficientnet_lite0", bundled=True, description="EfficientNet-Lite0, 4.7M params"),
        BackboneInfo("tf_efficientnet_lite1", bundled=True, description="EfficientNet-Lite1, 5.4M params"),
        BackboneInfo("tf_efficientnet_lite2", bundled=True, description="EfficientNet-Lite2, 6.1M params"),
        BackboneInfo("mobilenetv3_large_100", description="MobileNetV3-Large 1.0"),
        BackboneInfo("efficientnet_b0", description="EfficientNet-B0"),
        BackboneInfo("resnet18", description="ResNet-18"),
        BackboneInfo("resnet50", description="ResNet-50"),
        BackboneInfo("convnext_tiny", description="ConvNeXt-Tiny"),
        BackboneInfo("vit_small_patch16_224", description="ViT-S/16 (fixed 224 input)"),
        # timm's tiny test network: no pretrained weights, for fast plumbing runs.
        BackboneInfo("test_efficientnet", hub=False, description="tiny random EfficientNet for smoke tests"),
    )
}

WEIGHT_SOURCES = ("bundled", "hub", "none")


@dataclass(frozen=True)
class OptimInfo:
    """How a zoofit optimizer name maps onto ``timm.optim.create_optimizer_v2``.

    Attributes:
        name: zoofit name used in the job spec.
        timm_name: the ``opt`` string passed to timm's factory.
        uses_momentum: whether the spec's ``momentum`` is passed through.
        uses_betas: whether the spec's ``betas`` are passed through.
        description: one line for humans.
    """

    name: str
    timm_name: str
    uses_momentum: bool = False
    uses_betas: bool = False
    description: str = ""


OPTIMIZERS: dict[str, OptimInfo] = {
    o.name: o
    for o in (
        OptimInfo("sgd", "sgd", description="plain stochastic gradient descent (momentum 0)"),
        OptimInfo("momentum", "momentum", uses_momentum=True, description="SGD with heavy-ball momentum"),
        OptimInfo("nesterov", "nesterov", uses_momentum=True, description="SGD with Nesterov momentum"),
        OptimInfo("adagrad", "adagrad", description="AdaGrad: per-parameter sum of squared gradients"),
        OptimInfo("rmsprop", "rmsprop", uses_momentum=True, description="RMSProp: leaky AdaGrad"),
        OptimInfo("adam", "adam", uses_betas=True, description="Adam: momentum + RMSProp with bias correction"),
        OptimInfo("adamw", "adamw", uses_betas=True, description="Adam with decoupled weight decay"),
    )
}

SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")


def check_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> str:
    if name not in valid:
        raise UnknownNameError(kind, name, sorted(valid))
    return name


# --------------------------------------------------------------------------- the spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FreezeSpec(_Strict):
    """Which part of the backbone keeps its pretrained weights.

    ``linear_probe`` trains only the new classifier; ``first_n`` freezes the first
    ``stages`` parameter groups (stem counts as stage 0); ``none`` fine-tunes everything.
    """

    mode: Literal["none", "linear_probe", "first_n"] = "first_n"
    stages: int = Field(3, ge=0, le=64, description="frozen groups for mode=first_n (stem = 1)")
    train_bn: bool = Field(False, description="let BatchNorm in the frozen part update its statistics")


class AugmentSpec(_Strict):
    """Training-time augmentation; evaluation is always deterministic."""

    random_resized_crop: bool = True
    crop_scale_min: float = Field(0.6, gt=0.0, le=1.0)
    hflip: bool = True
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="brightness/contrast/saturation strength")


class OptimizerSpec(_Strict):
    name: str = "nesterov"
    lr: float = Field(0.01, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_name("optimizer", v, list(OPTIMIZERS))


class ScheduleSpec(_Strict):
    name: str = "cosine"
    warmup_epochs: int = Field(1, ge=0, le=1000)
    warmup_lr: float = Field(1e-5, ge=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    step_epochs: int = Field(5, ge=1, description="decay period for name=step")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="decay factor for name=step")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_name("schedule", v, SCHEDULES)


class EnsembleSpec(_Strict):
    members: int = Field(1, ge=1, le=16)
    backbones: list[str] = Field(
        default_factory=list,
        description="optional extra backbones; member i uses ([backbone] + backbones)[i % n]",
    )

    @field_validator("backbones")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            check_name("backbone", name, list(BACKBONES))
        return v


class TrainSpec(_Strict):
    """A complete fine-tuning recipe (everything but the dataset)."""

    backbone: str = "tf_efficientnet_lite0"
    weights: Literal["bundled", "hub", "none"] = "bundled"
    image_size: int | None = Field(
        None, ge=16, le=1024, description="training/inference resolution; default: backbone's native size"
    )
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    head_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    patience: int | None = Field(5, ge=1, description="early-stopping patience in epochs; null disables")
    seed: int = Field(0, ge=0, lt=2**32 - 64, description="member i uses seed + i")
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        return check_name("backbone", v, list(BACKBONES))

    @model_validator(mode="after")
    def _weights_available(self) -> TrainSpec:
        for name in self.member_backbones():
            info = BACKBONES[name]
            if self.weights == "bundled" and not info.bundled:
                bundled = [b.name for b in BACKBONES.values() if b.bundled]
                raise ValueError(
                    f"backbone {name!r} has no bundled weights; use weights='hub' (needs network) "
                    f"or 'none', or one of: {', '.join(bundled)}"
                )
            if self.weights == "hub" and not info.hub:
                raise ValueError(f"backbone {name!r} has no pretrained hub weights; use weights='none'")
        return self

    def member_backbones(self) -> list[str]:
        """Backbone name of each ensemble member, in order."""
        names = [self.backbone, *self.ensemble.backbones]
        return [names[i % len(names)] for i in range(self.ensemble.members)]


@dataclass
class EpochRecord:
    """One epoch of one member, as stored in the job history."""

    member: int
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
