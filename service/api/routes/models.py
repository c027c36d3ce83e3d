from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool

from service import models_store
from service.api.deps import PredictorsDep, SessionDep, SettingsDep, TenantDep
from service.errors import BadRequest, TooLarge
from service.schemas import ImagePrediction, LabelProbability, ModelPublic, ModelsPublic, PredictionPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> ModelsPublic:
    """List trained models, newest first."""
    rows, count = models_store.list_models(session, tenant, offset, limit)
    return ModelsPublic(data=[ModelPublic.model_validate(models_store.model_public(r)) for r in rows], count=count)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelPublic:
    """Classes, members, metrics and the job's spec of one model."""
    return ModelPublic.model_validate(models_store.model_public(models_store.get_model(session, model_id, tenant)))


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, session: SessionDep, predictors: PredictorsDep, tenant: TenantDep) -> None:
    """Delete a model and its stored weights."""
    models_store.delete_model(session, predictors, model_id, tenant)


@router.post("/{model_id}/predict", response_model=PredictionPublic)
async def predict(
    model_id: str,
    session: SessionDep,
    settings: SettingsDep,
    predictors: PredictorsDep,
    tenant: TenantDep,
    files: Annotated[list[UploadFile], File(description="one or more images")],
    top_k: Annotated[int, Query(ge=1)] = 5,
) -> PredictionPublic:
    """Top-k labels with probabilities for each image, from the averaged ensemble."""
    row = models_store.get_model(session, model_id, tenant)
    if len(files) > settings.predict_max_images:
        raise TooLarge(f"{len(files)} images in one request; the limit is {settings.predict_max_images}")
    top_k = min(top_k, len(row.classes), settings.predict_max_top_k)
    blobs: list[tuple[str, bytes]] = []
    total = 0
    for i, f in enumerate(files):
        data = await f.read(settings.predict_max_bytes + 1)
        total += len(data)
        if total > settings.predict_max_bytes:
            raise TooLarge(f"request images exceed {settings.predict_max_bytes} bytes")
        blobs.append((f.filename or f"image-{i}", data))
    results = await run_in_threadpool(_predict, predictors, model_id, Path(row.path), blobs, top_k,
                                      settings.max_image_pixels)
    return PredictionPublic(model_id=model_id, predictions=results)


def _predict(
    predictors: models_store.PredictorCache,
    model_id: str,
    path: Path,
    blobs: list[tuple[str, bytes]],
    top_k: int,
    max_pixels: int,
) -> list[ImagePrediction]:
    from PIL import Image as PILImage

    from models.data import open_image
    from models.errors import BadImageError

    images = []
    bad = []
    for name, data in blobs:
        try:
            # Read the header first: refuse a pixel bomb before decoding it.
            with PILImage.open(io.BytesIO(data)) as probe:
                w, h = probe.size
            if w * h > max_pixels:
                bad.append(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels}")
                continue
            images.append(open_image(data, name))
        except BadImageError as exc:
            bad.append(f"{name}: {exc}")
        except (OSError, PILImage.DecompressionBombError) as exc:
            reason = "too many pixels" if isinstance(exc, PILImage.DecompressionBombError) else "not an image"
            bad.append(f"{name}: {reason}")
    if bad:
        raise BadRequest("cannot decode image(s): " + "; ".join(bad), files=bad)
    predictor = predictors.get(model_id, path)
    out = predictor.predict(images, top_k=top_k)
    return [
        ImagePrediction(file=name, top_k=[LabelProbability(label=lbl, probability=p) for lbl, p in ranked])
        for (name, _), ranked in zip(blobs, out, strict=True)
    ]
