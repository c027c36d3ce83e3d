"""The training recipe: what a fine-tuning job asks for.

This module is deliberately free of torch and timm imports so the API process can
validate a job without loading the ML stack. The registries below name what the
engine supports; the engine (``models.zoo``, ``models.optim``, ...) turns them into
real objects and has tests that parametrize over these same registries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError


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
        input_size: native input side in pixels (timm's pretrained config; a test keeps them equal),
            known here so the API can size a job without importing timm.
    """

    name: str
    bundled: bool = False
    hub: bool = True
    description: str = ""
    input_size: int = 224


BACKBONES: dict[str, BackboneInfo] = {
    b.name: b
    for b in (
        BackboneInfo("tf_efficientnet_lite0", bundled=True, description="EfficientNet-Lite0, 4.7M params"),
        BackboneInfo("tf_efficientnet_lite1", bundled=True, description="EfficientNet-Lite1, 5.4M params",
                     input_size=240),
        BackboneInfo("tf_efficientnet_lite2", bundled=True, description="EfficientNet-Lite2, 6.1M params",
                     input_size=260),
        BackboneInfo("mobilenetv3_large_100", description="MobileNetV3-Large 1.0"),
        BackboneInfo("efficientnet_b0", description="EfficientNet-B0"),
        BackboneInfo("resnet18", description="ResNet-18"),
        BackboneInfo("resnet50", description="ResNet-50"),
        BackboneInfo("convnext_tiny", description="ConvNeXt-Tiny"),
        BackboneInfo("vit_small_patch16_224", description="ViT-S/16 (fixed 224 input)"),
        # timm's tiny test network: no pretrained weights, for fast plumbing runs.
        BackboneInfo(
            "test_efficientnet", hub=False, description="tiny random EfficientNet for smoke tests", input_size=160
        ),
    )
}

def multi_stage_supported(name: str) -> bool:
    """Whether ``head_features='multi_stage'`` can be built on this backbone (EfficientNet family)."""
    return "efficientnet" in name


# budget_s bounds: below ~5 s nothing but the planning fits; above a day is the job time limit's business.
MIN_BUDGET_S = 3.0
MAX_BUDGET_S = 86_400.0

WeightSource = Literal["bundled", "hub", "none"]
WEIGHT_SOURCES: tuple[WeightSource, ...] = ("bundled", "hub", "none")

# What a job may run on: "any" worker, or only a CPU or a CUDA one (``service.queue`` routes by it).
JobDevice = Literal["any", "cpu", "cuda"]
JOB_DEVICES: tuple[JobDevice, ...] = ("any", "cpu", "cuda")


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
        # Not a timm optimizer: torch.optim.LBFGS with a strong-Wolfe line search, full batch.
        OptimInfo(
            "lbfgs", "", description="L-BFGS (quasi-Newton), full batch on cached features: linear probe only"
        ),
    )
}

SCHEDULES: tuple[str, ...] = (
    "constant",
    "step",
    "multistep",
    "exponential",
    "inverse_time",
    "cosine",
    "cosine_restarts",
    "one_cycle",
    "plateau",
)

# Augmentation presets: each fills the AugmentSpec fields the request leaves out.
AUGMENT_PRESETS: dict[str, dict[str, object]] = {
    "none": {
        "random_resized_crop": False, "hflip": False, "color_jitter": 0.0, "auto_augment": "none",
        "random_erasing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
    },
    "light": {
        "random_resized_crop": True, "crop_scale_min": 0.8, "hflip": True, "color_jitter": 0.0,
        "auto_augment": "none", "random_erasing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
    },
    "standard": {
        "random_resized_crop": True, "crop_scale_min": 0.6, "hflip": True, "color_jitter": 0.2,
        "auto_augment": "none", "random_erasing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
    },
    "strong": {
        "random_resized_crop": True, "crop_scale_min": 0.35, "hflip": True, "color_jitter": 0.0,
        "auto_augment": "trivialaugment", "random_erasing": 0.25, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
    },
}


def check_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> str:
    if name not in valid:
        raise UnknownNameError(kind, name, sorted(valid))
    return name


def _known(kind: str, names: Iterable[str]) -> AfterValidator:
    valid = list(names)

    def check(name: str) -> str:
        return check_name(kind, name, valid)

    check_fn: Callable[[str], str] = check
    return AfterValidator(check_fn)


def _one_of(title: str, names: Iterable[str]) -> WithJsonSchema:
    """The JSON schema of a registry name: an enum of the registry's names.

    The value itself stays a ``str`` checked by :func:`check_name`, so that a wrong name is
    refused with a message naming it and listing the valid ones (a ``Literal`` would only say
    "Input should be ..."); clients generated from the schema still get an enum.
    """
    return WithJsonSchema({"title": title, "type": "string", "enum": list(names)})


BackboneName = Annotated[str, _known("backbone", BACKBONES), _one_of("BackboneName", BACKBONES)]
OptimizerName = Annotated[str, _known("optimizer", OPTIMIZERS), _one_of("OptimizerName", OPTIMIZERS)]
# lbfgs only fits a linear probe: a sweep cannot choose it (SweepSpec refuses it, saying why)
SweepOptimizerName = Annotated[
    str, _known("optimizer", OPTIMIZERS), _one_of("SweepOptimizerName", (n for n in OPTIMIZERS if n != "lbfgs"))
]
ScheduleName = Annotated[str, _known("schedule", SCHEDULES), _one_of("ScheduleName", SCHEDULES)]


# --------------------------------------------------------------------------- the spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FreezeSpec(_Strict):
    """The transfer strategy: which part of the backbone keeps its pretrained weights, and when.

    ``linear_probe`` trains only the new classifier; ``first_n`` freezes the first ``stages``
    parameter groups (the stem is group 0) for the whole run; ``none`` fine-tunes everything;
    ``gradual`` starts as a linear probe and unfreezes one more group, from the top, every
    ``unfreeze_every`` epochs, down to ``stages`` frozen groups; ``auto`` picks one of these from
    the number of training images per class (the job record says what it chose and why).
    """

    mode: Literal["none", "linear_probe", "first_n", "gradual", "auto"] = "first_n"
    stages: int = Field(3, ge=0, le=64, description="frozen groups for first_n; groups that stay frozen for gradual")
    unfreeze_every: int = Field(1, ge=1, le=1000, description="gradual: epochs between two unfreezings")
    train_bn: bool = Field(
        False, description="BatchNorm policy: false keeps the frozen part's running statistics fixed"
    )
    backbone_lr_mult: float = Field(
        1.0, gt=0.0, le=10.0, description="discriminative lr: backbone groups train at lr x this, the head at lr"
    )
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="timm layer-wise lr decay: each group lower gets lr x this once more"
    )


class AugmentSpec(_Strict):
    """Training-time augmentation; evaluation is always deterministic.

    ``preset`` (``none``, ``light``, ``standard``, ``strong``) fills every field the request leaves
    out (``AUGMENT_PRESETS``); a field given explicitly always wins.
    """

    preset: Literal["none", "light", "standard", "strong"] = "standard"
    random_resized_crop: bool = True
    crop_scale_min: float = Field(0.6, gt=0.0, le=1.0)
    hflip: bool = True
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="brightness/contrast/saturation strength")
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of erasing a random rectangle")
    mixup_alpha: float = Field(0.0, ge=0.0, le=10.0, description="mixup Beta(alpha, alpha); 0 disables")
    cutmix_alpha: float = Field(0.0, ge=0.0, le=10.0, description="cutmix Beta(alpha, alpha); 0 disables")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        if isinstance(data, dict):
            preset = data.get("preset", "standard")
            if preset in AUGMENT_PRESETS:
                return {**AUGMENT_PRESETS[preset], **data}
        return data

    @property
    def enabled(self) -> bool:
        """Whether any per-image augmentation is on (images differ between epochs)."""
        return (
            self.random_resized_crop
            or self.hflip
            or self.color_jitter > 0
            or self.auto_augment != "none"
            or self.random_erasing > 0
        )

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix mixes pairs of images."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


LR_AUTO = "auto"


def _learning_rate(value: object) -> float | Literal["auto"]:
    if value == LR_AUTO:
        return "auto"
    # pydantic's own error types, as a plain float field in (0, 10] gives them.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("float_type", "Input should be a valid number or 'auto'")
    if not float(value) > 0.0:
        raise PydanticKnownError("greater_than", {"gt": 0.0})
    if not float(value) <= 10.0:
        raise PydanticKnownError("less_than_equal", {"le": 10.0})
    return float(value)


class OptimizerSpec(_Strict):
    """The optimizer; ``lr: "auto"`` runs a learning-rate range test first (``models.lr_finder``)."""

    name: OptimizerName = "nesterov"
    # One validator, so a bad value is one error at optimizer.lr; generated clients see "auto" as a
    # one-value enum (a const branch is not tried before the number).
    lr: Annotated[
        float | Literal["auto"],
        PlainValidator(_learning_rate),
        WithJsonSchema({"anyOf": [
            {"type": "number", "exclusiveMinimum": 0.0, "maximum": 10.0},
            {"title": "LrAuto", "type": "string", "enum": ["auto"]},
        ]}),
    ] = Field(
        0.01,
        description="learning rate of the new head (the backbone's is a multiple of it), or 'auto': a "
        "learning-rate range test on the layers that train picks it (the report's lr_finder section)",
    )
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)

    def lr_value(self) -> float:
        """``lr`` as a number; ``"auto"`` is resolved (``models.lr_finder``) before anything uses it."""
        if isinstance(self.lr, str):
            raise ValueError("optimizer.lr is 'auto': the learning-rate finder resolves it before training")
        return float(self.lr)


class ScheduleSpec(_Strict):
    """Learning-rate schedule over the epochs, stepped once per epoch, after a linear warm-up.

    ``constant``; ``step`` (x ``gamma`` every ``step_epochs``); ``multistep`` (x ``gamma`` at each of
    ``milestones``); ``exponential`` (x ``gamma`` every epoch); ``inverse_time`` (lr / (1 + ``decay`` t));
    ``cosine`` (to ``min_lr`` at the end); ``cosine_restarts`` (cosine over ``cycle_epochs``, then
    restart, each cycle ``cycle_mult`` times longer); ``one_cycle`` (up from lr / ``div_factor`` to lr
    over ``pct_start`` of the run, then cosine down to ``min_lr``; its rise replaces ``warmup_epochs``);
    ``plateau`` (x ``gamma`` once the validation loss has not improved for more than
    ``plateau_patience`` epochs, as torch's ReduceLROnPlateau). ``t`` counts epochs after warm-up
    (``milestones`` too). ``min_lr`` floors cosine, cosine_restarts, one_cycle and plateau. L-BFGS
    ignores the lr and the schedule (its line search picks each step).
    """

    name: ScheduleName = "cosine"
    warmup_epochs: int = Field(1, ge=0, le=1000)
    warmup_lr: float = Field(1e-5, ge=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    step_epochs: int = Field(5, ge=1, description="decay period for name=step")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="decay factor for step, multistep, exponential, plateau")
    milestones: list[int] = Field(default_factory=lambda: [5, 8], description="multistep: epochs where lr drops")
    decay: float = Field(0.5, gt=0.0, le=100.0, description="inverse_time: lr / (1 + decay * t)")
    cycle_epochs: int = Field(5, ge=1, description="cosine_restarts: length of the first cycle")
    cycle_mult: float = Field(1.0, ge=1.0, le=10.0, description="cosine_restarts: each cycle this times longer")
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="one_cycle: share of the run spent rising")
    div_factor: float = Field(25.0, ge=1.0, le=1e4, description="one_cycle: starting lr is lr / div_factor")
    plateau_patience: int = Field(
        2, ge=0, le=1000, description="plateau: the lr drops after more than this many epochs without improvement"
    )

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(m < 1 or m > 1000 for m in v) or sorted(set(v)) != v:
            raise ValueError(f"milestones must be strictly increasing epochs in 1..1000, got {v}")
        return v


class EnsembleSpec(_Strict):
    """How many models are trained and how they are combined.

    ``members`` independent runs (seed + i, optionally other ``backbones``), or with ``snapshot``
    one run whose cosine schedule restarts ``members`` times: each cycle's final weights are a
    member (the schedule is then cyclic cosine and early stopping is off). ``ema`` keeps a Polyak /
    exponential moving average of each member's weights (timm ``ModelEmaV3``); ``serve`` picks
    which weights each member serves: ``raw``, ``ema`` or ``best`` (whichever validates better).
    ``greedy`` keeps a subset chosen by greedy forward selection (each member at most once) on validation.
    """

    members: int = Field(1, ge=1, le=16)
    backbones: list[BackboneName] = Field(
        default_factory=list,
        description="optional extra backbones; member i uses ([backbone] + backbones)[i % n]",
    )
    snapshot: bool = Field(False, description="members are the end-of-cycle weights of one cyclic-cosine run")
    ema: bool = Field(False, description="keep an exponential moving average of the weights")
    ema_decay: float = Field(0.998, ge=0.5, lt=1.0, description="per optimizer step")
    serve: Literal["raw", "ema", "best"] = Field("best", description="weights served when ema is on")
    greedy: bool = Field(False, description="greedy forward selection of members on validation")


class CacheSpec(_Strict):
    """The frozen-prefix cache: outputs of the layers that stay frozen, computed once per image.

    ``auto`` uses it whenever a prefix of the backbone is frozen for the whole run (exact without
    augmentation; with augmentation, ``views`` augmented views per image are computed once and
    cycled through, one per epoch). ``off`` always runs the full forward pass.
    """

    mode: Literal["auto", "off"] = "auto"
    views: int = Field(4, ge=1, le=64, description="augmented views per image cached when augmentation is on")


class SweepSpec(_Strict):
    """A hyperparameter search before the final training.

    ``trials`` configurations sample lr and weight decay log-uniformly from the ranges (and,
    when given, the optimizer, freeze depth and head dropout from the choices); successive halving
    trains all of them ``min_epochs``, keeps the best 1/``eta`` on validation accuracy, trains those
    ``eta`` times longer, and so on; ``rounds`` > 1 then narrows the ranges around the best and
    searches again (coarse to fine). The final model is trained from the best configuration.
    """

    trials: int = Field(8, ge=2, le=64)
    lr: tuple[float, float] = Field((1e-4, 1e-1), description="log-uniform range (the lr is at most 1 here)")
    weight_decay: tuple[float, float] = (1e-6, 1e-2)
    optimizers: list[SweepOptimizerName] = Field(
        default_factory=list, description="optimizer choices; empty: keep the spec's"
    )
    freeze_stages: list[int] = Field(default_factory=list, description="first_n depth choices; empty: keep")
    head_dropout: list[float] = Field(default_factory=list, description="dropout choices; empty: keep")
    min_epochs: int = Field(1, ge=1, le=100, description="epochs of the first halving rung")
    eta: int = Field(3, ge=2, le=8, description="successive halving keeps 1/eta per rung")
    rounds: int = Field(2, ge=1, le=4, description="coarse-to-fine rounds")

    @field_validator("lr", "weight_decay")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"a log-uniform range needs 0 < low <= high <= 1, got {list(v)}")
        return v

    @field_validator("optimizers")
    @classmethod
    def _no_lbfgs(cls, v: list[str]) -> list[str]:
        if "lbfgs" in v:
            raise ValueError("a sweep cannot choose lbfgs: it only fits a linear probe; sweep it on its own")
        return v

    @field_validator("head_dropout")
    @classmethod
    def _dropouts(cls, v: list[float]) -> list[float]:
        if any(not 0 <= p < 1 for p in v):
            raise ValueError(f"head_dropout choices must be in [0, 1), got {v}")
        return v

    @field_validator("freeze_stages")
    @classmethod
    def _stages(cls, v: list[int]) -> list[int]:
        if any(not 0 <= n <= 64 for n in v):
            raise ValueError(f"freeze_stages choices must be in 0..64, got {v}")
        return v


class TrainSpec(_Strict):
    """A complete fine-tuning recipe (everything but the dataset)."""

    backbone: BackboneName = "tf_efficientnet_lite0"
    weights: WeightSource = "bundled"
    image_size: int | None = Field(
        None, ge=16, le=1024, description="training/inference resolution; default: backbone's native size"
    )
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    head_dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout on the pooled features")
    drop_connect: float = Field(
        0.0, ge=0.0, lt=1.0, description="DropConnect on the classifier: drop this share of its weights"
    )
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth (timm drop_path_rate)")
    head_pool: Literal["avg", "fractional_max"] = Field("avg", description="global pooling before the classifier")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    patience: int | None = Field(5, ge=1, description="early-stopping patience in epochs; null disables")
    monitor: Literal["val_acc", "val_loss"] = Field(
        "val_acc", description="early stopping and best-weights metric (ties broken by the other)"
    )
    seed: int = Field(0, ge=0, lt=2**32 - 64, description="member i uses seed + i")
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    sweep: SweepSpec | None = Field(None, description="search hyperparameters first, then train the best")
    head_features: Literal["last", "multi_stage"] = Field(
        "last",
        description="what the classifier reads: the last stage's pooled features, or features pooled from "
        "several stages and joined (helps little data unlike ImageNet: grayscale, sketches, tiny images)",
    )
    budget_s: float | None = Field(
        None,
        ge=MIN_BUDGET_S,
        le=MAX_BUDGET_S,
        description="time budget in seconds: zoofit measures this hardware on the data and plans image size, "
        "frozen depth, epochs, members, head and lr for it (fields the request sets are kept), then ends "
        "within it with the best weights so far; the report's plan section says what and why",
    )
    keep: list[str] | None = Field(
        None,
        description="fields the planner keeps as given (dotted, e.g. 'ensemble.ema'); the service fills it "
        "with the fields the request set. A job that sets none and has no budget_s gets the default budget",
    )
    device: JobDevice = Field(
        "any",
        description="where the job trains: 'any' worker, or only a 'cpu' or a 'cuda' (GPU) one; a cuda job "
        "waits in the queue until a GPU worker takes it",
    )

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

    @model_validator(mode="after")
    def _lbfgs_fits(self) -> TrainSpec:
        if self.optimizer.name != "lbfgs":
            return self
        problems = []
        if self.freeze.mode != "linear_probe":
            problems.append(
                f"freeze.mode is {self.freeze.mode!r}: L-BFGS fits only the linear head on features computed "
                "once (freeze.mode='linear_probe'); to fine-tune layers with mini-batches use adam or nesterov"
            )
        if self.augment.mixes:
            problems.append("mixup/cutmix change the objective every step; set mixup_alpha=cutmix_alpha=0")
        if self.head_dropout > 0 or self.drop_connect > 0:
            problems.append(
                f"dropout makes the objective random and breaks the line search; set head_dropout=0 and "
                f"drop_connect=0 (got {self.head_dropout}, {self.drop_connect})"
            )
        if self.ensemble.snapshot or self.ensemble.ema:
            problems.append("snapshot ensembles and EMA average SGD iterates; L-BFGS converges to one optimum")
        if self.head_pool != "avg":
            problems.append("fractional max pooling is random in training; use head_pool='avg'")
        if self.cache.mode == "off":
            problems.append("L-BFGS runs full batch on cached features; cache.mode must be 'auto'")
        if problems:
            raise ValueError("optimizer 'lbfgs' is a poor fit here: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _plannable(self) -> TrainSpec:
        if self.budget_s is not None and self.sweep is not None:
            raise ValueError("budget_s plans the recipe itself; a sweep cannot run inside it: drop one of them")
        if self.head_features == "multi_stage":
            bad = [b for b in self.member_backbones() if not multi_stage_supported(b)]
            if bad:
                raise ValueError(
                    f"head_features='multi_stage' needs an EfficientNet-family backbone "
                    f"({', '.join(n for n in BACKBONES if multi_stage_supported(n))}), not {', '.join(bad)}"
                )
            if self.head_pool != "avg":
                raise ValueError("head_features='multi_stage' pools every stage by its average: use head_pool='avg'")
        if self.optimizer.lr == LR_AUTO and self.optimizer.name == "lbfgs":
            raise ValueError("L-BFGS picks its own steps (line search): lr='auto' does not apply, drop it")
        return self

    @model_validator(mode="after")
    def _ensemble_fits(self) -> TrainSpec:
        if self.ensemble.snapshot and self.ensemble.members > self.epochs:
            raise ValueError(
                f"a snapshot ensemble of {self.ensemble.members} members needs at least that many epochs "
                f"(one cycle each), got epochs={self.epochs}"
            )
        if self.ensemble.snapshot and self.ensemble.backbones:
            raise ValueError("a snapshot ensemble is one run of one backbone; drop ensemble.backbones")
        if self.sweep is not None and self.sweep.freeze_stages and self.freeze.mode not in ("first_n", "gradual"):
            raise ValueError(
                f"sweep.freeze_stages only applies to freeze.mode 'first_n' or 'gradual', not {self.freeze.mode!r}"
            )
        if self.head_pool == "fractional_max" and any(b.startswith("vit") for b in self.member_backbones()):
            raise ValueError("head_pool='fractional_max' needs a convolutional feature map; ViT has none")
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
