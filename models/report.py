"""The evaluation report of a trained ensemble, as typed models.

``TrainResult.evaluation_report()`` fills a ``Report``; the service stores its JSON once per model
and answers ``GET /v1/models/{id}/report`` with it, so ``/openapi.json`` documents the report from
these classes (no second copy in ``service/schemas.py``). ``ReportSummary`` is the compact part
that list endpoints carry (no confusion matrix, curves or sweep trials).

Metrics that can be undefined (an empty reliability bin, a diverged loss) are ``Metric``: JSON has
no NaN or infinity, so a value that is not finite becomes null.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, or None when it is missing, NaN or infinite (JSON has neither)."""
    return float(x) if x is not None and math.isfinite(x) else None


Metric = Annotated[float | None, BeforeValidator(finite_or_none)]


class _Section(BaseModel):
    # Reports stored by earlier releases may carry keys this one no longer writes: keep them.
    model_config = ConfigDict(extra="allow")


class ClassMetrics(_Section):
    label: str
    precision: float
    recall: float
    f1: float
    support: int = Field(description="validation images of this class")


class AveragedMetrics(_Section):
    precision: float
    recall: float
    f1: float


class Evaluation(_Section):
    """``models.evaluation.classification_report`` of the ensemble on the validation split."""

    size: int = Field(description="validation images")
    accuracy: Metric
    top_k_acc: dict[str, Metric] = Field(description="k -> top-k accuracy, for k up to the class count")
    per_class: list[ClassMetrics]
    macro_avg: AveragedMetrics
    weighted_avg: AveragedMetrics
    confusion: list[list[int]] = Field(description="counts; row = true class, column = predicted, in class order")


class ReliabilityBin(_Section):
    lower: float
    upper: float
    count: int
    confidence: Metric = Field(description="mean largest probability in the bin; null when empty")
    accuracy: Metric


class CalibrationState(_Section):
    ece: Metric = Field(description="expected calibration error")
    nll: Metric = Field(description="mean negative log-likelihood")
    reliability: list[ReliabilityBin]


class Calibration(_Section):
    """``models.evaluation.calibration_report``: ECE and NLL before and after temperature scaling."""

    bins: int
    temperature: float
    temperature_bounds: tuple[float, float]
    before: CalibrationState
    after: CalibrationState = Field(description="after temperature scaling (fitted on the same split)")


class MemberCurves(_Section):
    member: int
    best_epoch: int | None
    epoch: list[int] = Field(description="0-based, as in the job history")
    train_loss: list[Metric]
    val_loss: list[Metric]
    train_acc: list[Metric]
    val_acc: list[Metric]
    lr: list[Metric]


class MemberReport(_Section):
    """One served member: where its weights come from and how it was frozen."""

    backbone: str
    seed: int
    val_acc: float
    val_loss: Metric
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    trainable_params: int
    total_params: int
    freeze_mode: str
    frozen_groups: list[str]
    head: dict[str, Any] = Field(default_factory=dict, description="dropout, DropConnect, drop-path and pooling")
    served: str = Field("raw", description="raw, ema (Polyak average), snapshot or ema snapshot")


class SweepTrial(_Section):
    trial: int = Field(description="configuration id, 0-based, unique across rounds")
    round: int = Field(description="coarse-to-fine round, 0-based")
    rung: int = Field(description="successive-halving rung, 0-based; each rung trains from scratch")
    epochs: int
    lr: float
    weight_decay: float
    optimizer: str
    freeze_stages: int
    head_dropout: float
    status: str = Field(description="running, done or failed (diverged: ranked last)")
    outcome: str | None = Field(description="promoted, stopped, or best (the round's winner); null while running")
    val_acc: float | None
    val_loss: Metric
    seconds: float
    error: str | None


class SweepRound(_Section):
    round: int
    lr: tuple[float, float] = Field(description="log-uniform range sampled in this round")
    weight_decay: tuple[float, float]
    trials: int


class Sweep(_Section):
    """The hyperparameter sweep that chose the model's recipe (``models.sweep.SweepResult.to_dict``)."""

    trials: list[SweepTrial] = Field(description="one record per trial and rung, in the order run")
    rounds: list[SweepRound]
    best: SweepTrial | None
    final_spec: dict[str, Any] | None = Field(description="the recipe the final model was trained with")
    epochs_trained: int = Field(description="epochs spent on trials")
    seconds: float


class RunComparison(_Section):
    member: int
    raw_best_val_acc: float
    raw_last_val_acc: float
    ema_best_val_acc: float | None
    ema_last_val_acc: float | None


class ServedComparison(_Section):
    served: str
    val_acc: float


class Comparison(_Section):
    """Raw, EMA and ensemble validation accuracy side by side."""

    runs: list[RunComparison] = Field(default_factory=list, description="per trained run: raw and EMA accuracy")
    members: list[ServedComparison] = Field(default_factory=list, description="every member before selection")
    ensemble_all_val_acc: float | None = Field(None, description="all members averaged")
    ensemble_val_acc: float | None = Field(None, description="the served ensemble (after greedy selection)")


class TransferApplied(_Section):
    mode: str = Field(description="the strategy run (auto resolves to one of the others)")
    requested: str
    stages: int
    why: str
    backbone_lr_mult: float
    layer_decay: float | None
    train_bn: bool


class ParamGroupApplied(_Section):
    lr: float
    params: int
    weight_decay: float


class MemberApplied(_Section):
    """What one member's run actually did."""

    member: int
    backbone: str
    transfer: TransferApplied
    cache: dict[str, Any] = Field(description="the frozen-prefix feature cache: path (memory, disk, off) and why")
    optimizer: str
    param_groups: list[ParamGroupApplied] = Field(description="the optimizer's groups and their initial lr")
    schedule: str
    head: dict[str, Any]
    augment: str | None = Field(description="the training transform, or null without augmentation")
    mixup: bool
    label_smoothing: float
    ema: bool
    drop_path: dict[str, Any] | None = Field(None, description="rate and residual blocks it can drop")
    lbfgs: dict[str, Any] | None = Field(None, description="L-BFGS: final gradient norm and iterations")
    epochs_run: int | None = None
    best_epoch: int | None = None
    served: str | None = None


class GreedyApplied(_Section):
    chosen: list[int] = Field(description="member indices kept, in the order added")
    nll_path: list[float] = Field(description="validation NLL after each addition")
    all_val_acc: float
    note: str


class SnapshotApplied(_Section):
    cycles: int
    cycle_ends: list[int]


class Applied(_Section):
    """What the run actually did: per member, plus greedy selection and snapshots."""

    members: list[MemberApplied] = Field(default_factory=list)
    greedy: GreedyApplied | None = None
    snapshot: SnapshotApplied | None = None


class LrFinder(_Section):
    """The learning-rate range test of ``optimizer.lr: "auto"`` (``models.lr_finder``)."""

    lrs: list[Metric] = Field(description="lr of each step (exponentially increasing)")
    losses: list[Metric] = Field(description="training loss of each step")
    smoothed: list[Metric] = Field(description="the losses smoothed (EMA with bias correction)")
    lr_min_div10: float = Field(description="a tenth of the lr with the lowest smoothed loss")
    lr_steepest: float = Field(description="the lr where the smoothed loss falls fastest")
    lr: float = Field(description="the lr picked and trained with")
    method: str
    iterations: int
    seconds: float
    stopped: str = Field(description="why the test ended (all steps, or diverged)")


class PlanThroughput(_Section):
    size: int
    depth: str = Field(description="linear_probe, top, most or all (what trains)")
    frozen_groups: int
    prefix_img_s: float = Field(description="images/s through the frozen prefix (computed once, cached)")
    train_img_s: float = Field(description="images/s of a training step of the part that trains")
    eval_img_s: float
    cached: bool
    backbone: str | None = Field(None, description="the network measured (several when a larger one was tried)")


class Plan(_Section):
    """What the time-budget planner chose and why (``models.planner``)."""

    budget_s: float
    default_budget: bool = Field(description="the budget was the device's default (the job set no field)")
    device: str
    kept: list[str] = Field(description="fields the user set, kept as given")
    planned: dict[str, Any] = Field(description="the fields the planner set, and their values")
    why: list[str]
    throughputs: list[PlanThroughput] = Field(description="measured on this device with the job's images")
    measure_seconds: float
    estimate_seconds: float = Field(description="what the plan was expected to take, measurement included")
    head: dict[str, Any] | None = Field(None, description="linear probes of the last vs several stages' features")
    domain: dict[str, Any] | None = Field(
        None, description="linear probes that judged whether the data looks like ImageNet (how deep to fine-tune)"
    )
    spec: dict[str, Any] = Field(default_factory=dict, description="the recipe trained")
    seconds: float | None = Field(None, description="what the job took up to the end of training")
    deadline: dict[str, Any] | None = Field(None, description="where the deadline stopped training, if it did")
    members_skipped: dict[str, Any] | None = Field(
        None, description="planned members not started: at the last member's pace they would have missed the deadline"
    )
    members_shortened: dict[str, Any] | None = Field(
        None, description="members trained with fewer epochs (a shorter schedule) so that they end before the deadline"
    )


class ValPrediction(_Section):
    """What the served ensemble said about one validation image (fastai's "top losses")."""

    file: str | None = Field(description="the image, relative to the dataset root (<class>/<file>); null if unknown")
    label: str = Field(description="true class")
    predicted: str = Field(description="the most probable class")
    confidence: float = Field(description="probability of the predicted class (temperature-scaled, as predict says)")
    loss: Metric = Field(description="negative log of the true class's probability (temperature-scaled)")


class ReportSummary(BaseModel):
    """The compact part of a report that lists carry (validated from a whole report, it drops the rest)."""

    model_config = ConfigDict(extra="ignore")

    val_acc: float
    val_loss: Metric
    member_val_acc: list[float]
    num_classes: int
    train_size: int
    val_size: int
    image_size: int
    device: str
    seconds: float
    temperature: float = Field(1.0, description="applied at predict: p = softmax(log p_ensemble / T)")


class Report(ReportSummary):
    """A model's evaluation report on its held-out validation split (the averaged ensemble)."""

    model_config = ConfigDict(extra="allow")

    members: list[MemberReport]
    classes: list[str]
    split_counts: dict[str, list[int]] = Field(description="per class: [train, validation] images")
    amp: str | None = Field(description="mixed-precision dtype on a GPU, null for fp32")
    epoch_seconds: float = Field(description="time in epochs (training plus validation)")
    evaluation: Evaluation
    calibration: Calibration
    curves: list[MemberCurves]
    applied: Applied = Field(
        default_factory=Applied,
        description="what each member's run actually did: transfer strategy (and why, for auto), frozen-prefix "
        "cache path, optimizer groups and their lr, schedule, head, augmentation, EMA, snapshots, greedy selection",
    )
    comparison: Comparison = Field(
        default_factory=Comparison, description="raw, EMA and ensemble validation accuracy side by side"
    )
    sweep: Sweep | None = Field(None, description="the sweep before the final training, if the job had one")
    plan: Plan | None = Field(None, description="the time-budget plan (budget_s), if the job had one")
    lr_finder: LrFinder | None = Field(None, description="the learning-rate range test (optimizer.lr 'auto')")
    deadline: dict[str, Any] | None = Field(None, description="where the time budget's deadline stopped training")
    members_skipped: dict[str, Any] | None = Field(
        None, description="members not started under the time budget: at the last one's pace they would miss it"
    )
    members_shortened: dict[str, Any] | None = Field(
        None, description="members trained with fewer epochs under the time budget, so that they end before it"
    )
    val_predictions: list[ValPrediction] | None = Field(
        None,
        description="per validation image, highest loss first: file, true and predicted class, confidence, loss "
        "(at most VAL_PREDICTIONS_MAX, the highest losses; null for models trained before it was kept)",
    )

    def summary(self) -> ReportSummary:
        """The compact part (what list endpoints carry)."""
        return ReportSummary.model_validate(self.model_dump())
