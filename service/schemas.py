"""HTTP schemas, named by role (``JobCreate``, ``JobPublic``, ``JobsPublic``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.spec import TrainSpec


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


class JobCreate(TrainSpec):
    """A fine-tuning job: the dataset plus the training recipe (every field has a default)."""

    dataset_id: str = Field(..., min_length=1, max_length=64)


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


class Message(BaseModel):
    message: str
