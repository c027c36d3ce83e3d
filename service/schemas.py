"""HTTP schemas, named by role (``JobCreate``, ``JobPublic``, ``JobsPublic``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.spec import TrainSpec
from service.auth import TENANT_PATTERN


class SkippedFile(BaseModel):
    file: str
    reason: str


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    classes: list[str]
    counts: dict[str, int]
    num_images: int
    skipped: list[SkippedFile] = []
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class BackbonePublic(BaseModel):
    name: str
    description: str
    parameters: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weight_sources: list[str]


class BackbonesPublic(BaseModel):
    data: list[BackbonePublic]
    count: int


class KeyCreate(BaseModel):
    tenant: str = Field(..., pattern=TENANT_PATTERN)
    admin: bool = False


class KeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant: str
    prefix: str
    admin: bool
    revoked: bool
    created_at: datetime


class KeyCreated(KeyPublic):
    key: str = Field(description="the API key; shown only now, store it safely")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int


class JobCreate(TrainSpec):
    """A fine-tuning job: the dataset plus the training recipe (every field has a default)."""

    # No NUL: PostgreSQL cannot even compare text holding one (a 500 before; found by fuzzing).
    dataset_id: str = Field(..., min_length=1, max_length=64, pattern=r"^[^\x00]+$")


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    dataset_id: str
    status: str
    spec: dict[str, Any]
    progress: dict[str, Any]
    history: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    model_id: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    job_id: str
    dataset_id: str
    classes: list[str]
    members: list[dict[str, Any]]
    metrics: dict[str, Any]
    spec: dict[str, Any]
    preprocess: dict[str, Any]
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class LabelProbability(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    file: str
    top_k: list[LabelProbability]


class PredictionPublic(BaseModel):
    model_id: str
    predictions: list[ImagePrediction]


# Test-time augmentation at predict; the engine's registry is ``models.artifact.TTA_MODES``
# (kept equal by a test: this module must not import torch).
TTAMode = Literal["none", "hflip", "five_crop"]


class ClassMetricsPublic(BaseModel):
    label: str
    precision: float
    recall: float
    f1: float
    support: int = Field(description="validation images of this class")


class AveragedMetricsPublic(BaseModel):
    precision: float
    recall: float
    f1: float


class EvaluationPublic(BaseModel):
    size: int = Field(description="validation images")
    accuracy: float | None
    top_k_acc: dict[str, float | None] = Field(description="k -> top-k accuracy, for k up to the class count")
    per_class: list[ClassMetricsPublic]
    macro_avg: AveragedMetricsPublic
    weighted_avg: AveragedMetricsPublic
    confusion: list[list[int]] = Field(description="counts; row = true class, column = predicted, in class order")


class ReliabilityBinPublic(BaseModel):
    lower: float
    upper: float
    count: int
    confidence: float | None = Field(description="mean largest probability in the bin; null when empty")
    accuracy: float | None


class CalibrationStatePublic(BaseModel):
    ece: float | None = Field(description="expected calibration error")
    nll: float | None = Field(description="mean negative log-likelihood")
    reliability: list[ReliabilityBinPublic]


class CalibrationPublic(BaseModel):
    bins: int
    temperature: float
    temperature_bounds: tuple[float, float]
    before: CalibrationStatePublic
    after: CalibrationStatePublic = Field(description="after temperature scaling (fitted on the same split)")


class MemberCurvesPublic(BaseModel):
    member: int
    best_epoch: int | None
    epoch: list[int] = Field(description="0-based, as in the job history")
    train_loss: list[float | None]
    val_loss: list[float | None]
    train_acc: list[float | None]
    val_acc: list[float | None]
    lr: list[float | None]


class SweepTrialPublic(BaseModel):
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
    val_loss: float | None
    seconds: float
    error: str | None


class SweepRoundPublic(BaseModel):
    round: int
    lr: tuple[float, float] = Field(description="log-uniform range sampled in this round")
    weight_decay: tuple[float, float]
    trials: int


class SweepPublic(BaseModel):
    """The hyperparameter sweep that chose the model's recipe (``models.sweep.SweepResult.to_dict``)."""

    trials: list[SweepTrialPublic] = Field(description="one record per trial and rung, in the order run")
    rounds: list[SweepRoundPublic]
    best: SweepTrialPublic | None
    final_spec: dict[str, Any] | None = Field(description="the recipe the final model was trained with")
    epochs_trained: int = Field(description="epochs spent on trials")
    seconds: float


class ReportPublic(BaseModel):
    """A model's evaluation report on its held-out validation split (the averaged ensemble)."""

    model_id: str
    classes: list[str]
    val_acc: float
    val_loss: float | None
    val_size: int
    train_size: int
    temperature: float = Field(description="applied at predict: p = softmax(log p_ensemble / T)")
    evaluation: EvaluationPublic
    calibration: CalibrationPublic
    curves: list[MemberCurvesPublic]
    members: list[dict[str, Any]]
    sweep: SweepPublic | None = Field(None, description="the sweep before the final training, if the job had one")
    applied: dict[str, Any] = Field(
        default_factory=dict,
        description="what each member's run actually did: transfer strategy (and why, for auto), frozen-prefix "
        "cache path, optimizer groups and their lr, schedule, head, augmentation, EMA, snapshots, greedy selection",
    )
    comparison: dict[str, Any] = Field(
        default_factory=dict, description="raw, EMA and ensemble validation accuracy side by side"
    )
    figures: dict[str, str] = Field(description="PNG routes of this report")
