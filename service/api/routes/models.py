from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from service import models_store
from service.api.deps import (
    BatcherDep,
    LimitQuery,
    OffsetQuery,
    PredictorsDep,
    SessionDep,
    SettingsDep,
    TenantDep,
)
from service.errors import TooLarge
from service.problems import problem_responses
from service.schemas import (
    ImagePrediction,
    LabelProbability,
    ModelPublic,
    ModelsPublic,
    ModelSummaryPublic,
    PredictionPublic,
    PredictQuery,
    ReportPublic,
)

if TYPE_CHECKING:
    import torch

    from models.artifact import Predictor
    from service.config import Settings

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelsPublic, operation_id="models-list")
def list_models(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    offset: OffsetQuery = 0, limit: LimitQuery = 100
) -> ModelsPublic:
    """List trained models, newest first."""
    rows, count = models_store.list_models(session, tenant, offset, limit)
    return ModelsPublic(
        data=[ModelSummaryPublic.model_validate(models_store.model_public(settings, r)) for r in rows], count=count
    )


@router.get("/{model_id}", response_model=ModelPublic, operation_id="models-get", responses=problem_responses(404))
def get_model(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelPublic:
    """Classes, members, metrics and the job's spec of one model."""
    row = models_store.get_model(session, model_id, tenant)
    return ModelPublic.model_validate(models_store.model_public(settings, row, with_report=True))


_FIGURES = ("curves", "confusion", "reliability", "lr_finder")
_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "PNG image"},
    **problem_responses(404),
}


@router.get("/{model_id}/report", response_model=ReportPublic, operation_id="models-report",
            responses=problem_responses(404))
def get_report(
    model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep, request: Request
) -> ReportPublic:
    """Evaluation report: per-class metrics, confusion matrix, top-k accuracy, calibration, curves."""
    row = models_store.get_model(session, model_id, tenant)
    report = models_store.model_report(settings, row)
    figures = {
        name: request.url_for(f"report_{name}_png", model_id=model_id).path
        for name in _FIGURES
        if name != "lr_finder" or report.get("lr_finder")  # only a job with lr 'auto' has one
    }
    return ReportPublic.model_validate({**report, "model_id": model_id, "figures": figures})


def _figure(model_id: str, session: SessionDep, settings: Settings, tenant: str, name: str) -> Response:
    row = models_store.get_model(session, model_id, tenant)
    return Response(models_store.report_figure(settings, row, name), media_type="image/png")


@router.get("/{model_id}/report/curves.png", response_class=Response, responses=_PNG, name="report_curves_png",
            operation_id="models-report-curves")
def report_curves_png(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """Train/val loss and accuracy and the learning rate per epoch, one colour per member."""
    return _figure(model_id, session, settings, tenant, "curves")


@router.get("/{model_id}/report/confusion.png", response_class=Response, responses=_PNG,
            name="report_confusion_png", operation_id="models-report-confusion")
def report_confusion_png(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """The validation confusion matrix (colour: share of the true class; text: counts)."""
    return _figure(model_id, session, settings, tenant, "confusion")


@router.get("/{model_id}/report/reliability.png", response_class=Response, responses=_PNG,
            name="report_reliability_png", operation_id="models-report-reliability")
def report_reliability_png(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """Reliability diagrams before and after temperature scaling, with ECE and NLL."""
    return _figure(model_id, session, settings, tenant, "reliability")


@router.get("/{model_id}/report/lr_finder.png", response_class=Response, responses=_PNG,
            name="report_lr_finder_png", operation_id="models-report-lr-finder")
def report_lr_finder_png(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """The learning-rate range test of a job with lr 'auto': loss against lr, the pick marked (404 otherwise)."""
    return _figure(model_id, session, settings, tenant, "lr_finder")


@router.delete("/{model_id}", status_code=204, operation_id="models-delete", responses=problem_responses(404))
def delete_model(
    model_id: str, session: SessionDep, settings: SettingsDep, predictors: PredictorsDep, tenant: TenantDep
) -> None:
    """Delete a model and its stored weights."""
    models_store.delete_model(session, settings, predictors, model_id, tenant)


@router.post("/{model_id}/predict", response_model=PredictionPublic, operation_id="models-predict",
             responses=problem_responses(404))
async def predict(
    model_id: str,
    session: SessionDep,
    settings: SettingsDep,
    predictors: PredictorsDep,
    batcher: BatcherDep,
    tenant: TenantDep,
    files: Annotated[list[UploadFile], File(description="one or more images")],
    options: Annotated[PredictQuery, Query()],
) -> PredictionPublic:
    """Top-k labels with probabilities for each image, from the averaged, temperature-scaled ensemble."""
    key, num_classes = models_store.model_location(session, model_id, tenant)
    # Nothing below needs the database: give its connection back to the pool now instead of holding
    # it while the images decode and wait for their batch (concurrent requests outnumber the pool).
    session.close()
    if len(files) > settings.predict_max_images:
        raise TooLarge(f"{len(files)} images in one request; the limit is {settings.predict_max_images}")
    top_k, tta = min(options.top_k, num_classes, settings.predict_max_top_k), options.tta
    blobs: list[tuple[str, bytes]] = []
    total = 0
    for i, f in enumerate(files):
        data = await f.read(settings.predict_max_bytes + 1)
        total += len(data)
        if total > settings.predict_max_bytes:
            raise TooLarge(f"request images exceed {settings.predict_max_bytes} bytes")
        blobs.append((f.filename or f"image-{i}", data))
    # Decoding, resizing and loading the model run in the threadpool; the forward pass is shared
    # with concurrent requests on the batcher's inference thread.
    predictor, views = await run_in_threadpool(_prepare, predictors, model_id, key, blobs, settings, tta)
    probs = await batcher.predict_proba(predictor, views, tta)
    ranked = predictor.rank(probs, top_k)
    return PredictionPublic(model_id=model_id, predictions=[
        ImagePrediction(file=name, top_k=[LabelProbability(label=lbl, probability=p) for lbl, p in labels])
        for (name, _), labels in zip(blobs, ranked, strict=True)
    ])


def _prepare(
    predictors: models_store.PredictorCache,
    model_id: str,
    key: str,
    blobs: list[tuple[str, bytes]],
    settings: Settings,
    tta: str = "none",
) -> tuple[Predictor, list[torch.Tensor]]:
    """The loaded model and the TTA views of the images (``Predictor.views_of_arrays``).

    The headers are checked before the model is loaded; then each image is decoded straight to
    the model's input size and released before the next (``service.decoding``).

    Raises:
        BadRequest: an image is not an allowed format, does not decode or has too many pixels (all named).
        TooLarge: the images have more pixels in all than the request may.
    """
    from service.decoding import DecodeLimits, check_headers, decode_arrays

    limits = DecodeLimits(
        max_image_pixels=settings.max_image_pixels,
        max_request_pixels=settings.predict_max_request_pixels,
        slots=settings.predict_decode_slots,
        slot_wait_s=settings.predict_decode_wait_s,
    )
    check_headers(blobs, limits)
    predictor = predictors.get(model_id, key)
    arrays = decode_arrays(blobs, predictor.input_side(tta), predictor.preprocess.interpolation, limits)
    return predictor, predictor.views_of_arrays(arrays, tta)
