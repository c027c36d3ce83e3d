"""HTTP schemas, named by role (``JobCreate``, ``JobPublic``, ``JobsPublic``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from models.report import Report, ReportSummary
from models.spec import BackboneName, TrainSpec, WeightSource
from service.auth import TENANT_PATTERN
from service.presets import PRESETS

# Closed sets, as enums in the schema (a test keeps JobStatusName equal to service.db.JobStatus.ALL).
JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
PresetName = Annotated[str, WithJsonSchema({"title": "PresetName", "type": "string", "enum": list(PRESETS)})]


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


class ClassSamples(BaseModel):
    label: str
    count: int = Field(description="images of the class in the stored dataset")
    files: list[str] = Field(description="a few of them, <class>/<file>, for GET .../thumbnails/{file}")


class DatasetSamplesPublic(BaseModel):
    dataset_id: str
    data: list[ClassSamples]


class BackbonePublic(BaseModel):
    name: BackboneName
    description: str
    parameters: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weight_sources: list[WeightSource]


class BackbonesPublic(BaseModel):
    data: list[BackbonePublic]
    count: int


class PresetPublic(BaseModel):
    """A named starting recipe: ``job`` is a partial job, submitted with a ``dataset_id``."""

    name: PresetName
    title: str
    description: str
    job: dict[str, Any]


class PresetsPublic(BaseModel):
    data: list[PresetPublic]
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


class KeyRevoked(KeyPublic):
    cancelled_jobs: list[str] = Field(description="jobs of the tenant cancelled with it (cancel_jobs=true)")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int


class JobCreate(TrainSpec):
    """A fine-tuning job: the dataset plus the training recipe (every field has a default)."""

    # No NUL: PostgreSQL cannot even compare text holding one (a 500 before; found by fuzzing).
    dataset_id: str = Field(..., min_length=1, max_length=64, pattern=r"^[^\x00]+$")


class JobSummaryPublic(BaseModel):
    """A job as lists show it: no per-epoch history, the report's summary only."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    dataset_id: str
    status: JobStatusName
    spec: dict[str, Any]
    progress: dict[str, Any]
    metrics: ReportSummary | None = Field(description="the trained model's headline figures")
    error: str | None
    cancel_requested: bool
    model_id: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPublic(JobSummaryPublic):
    """One job: its per-epoch history and, once it succeeded, its model's whole evaluation report."""

    history: list[dict[str, Any]]
    metrics: Report | ReportSummary | None = Field(  # type: ignore[assignment]
        description="the model's evaluation report (its summary once the model is deleted)"
    )


class JobsPublic(BaseModel):
    data: list[JobSummaryPublic]
    count: int


class ModelSummaryPublic(BaseModel):
    """A model as lists show it: the report's summary only."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    job_id: str
    dataset_id: str
    classes: list[str]
    members: list[dict[str, Any]]
    metrics: ReportSummary
    spec: dict[str, Any]
    preprocess: dict[str, Any]
    created_at: datetime


class ModelPublic(ModelSummaryPublic):
    """One model, with its whole evaluation report as ``metrics``."""

    metrics: Report | ReportSummary  # type: ignore[assignment]


class ModelsPublic(BaseModel):
    data: list[ModelSummaryPublic]
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


class PredictQuery(BaseModel):
    """Query parameters of ``POST /v1/models/{id}/predict``."""

    top_k: int = Field(5, ge=1, description="labels per image (at most the class count)")
    tta: TTAMode = Field("none", description="test-time augmentation, averaged with the ensemble")


ExportFormatName = Literal["onnx", "torchscript", "safetensors"]  # models.export.EXPORT_FORMATS (a test checks)
QuantizationName = Literal["none", "int8_dynamic", "int8_static"]  # models.export.QUANTIZATIONS


class ExportCreate(BaseModel):
    """What to export: a format, and for ONNX an optional int8 quantization."""

    model_config = ConfigDict(extra="forbid")

    format: ExportFormatName = Field(description="onnx, torchscript or safetensors")
    quantization: QuantizationName = Field(
        "none", description="ONNX only: int8_dynamic, or int8_static calibrated on the training images; refused "
        "(the export fails) when validation top-1 drops more than 1 point",
    )

    @model_validator(mode="after")
    def _onnx_only(self) -> ExportCreate:
        if self.quantization != "none" and self.format != "onnx":
            raise ValueError(f"quantization applies to onnx exports only, not {self.format}")
        return self


class ExportPublic(BaseModel):
    """An export of a model: its status and, once succeeded, where to download the bundle."""

    id: str
    model_id: str
    format: ExportFormatName
    quantization: QuantizationName
    status: JobStatusName
    error: str | None = Field(description="why it failed, in one line")
    size_bytes: int | None
    details: dict[str, Any] = Field(
        description="what the export measured: fidelity (max_abs_diff, top1_agreement against the service), int8 "
        "(validation top-1 before and after, delta_points), files (sha256 of each)"
    )
    download: str | None = Field(description="the bundle's route, once succeeded")
    created_at: datetime
    finished_at: datetime | None


class ExportsPublic(BaseModel):
    data: list[ExportPublic]
    count: int


class ReportPublic(Report):
    """A model's evaluation report on its held-out validation split (the averaged ensemble)."""

    model_id: str
    figures: dict[str, str] = Field(description="PNG routes of this report")
