from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from service import datasets
from service.api.deps import IdempotencyKeyDep, LimitQuery, OffsetQuery, SessionDep, SettingsDep, TenantDep
from service.errors import TooLarge
from service.problems import problem_responses
from service.schemas import ClassSamples, DatasetPublic, DatasetSamplesPublic, DatasetsPublic

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic, operation_id="datasets-upload")
async def upload_dataset(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description=".zip, .tar or .tar.gz of <class>/<image> folders")],
    name: Annotated[str | None, Form(max_length=255, pattern=r"^[^\x00]*$")] = None,
    on_bad_file: Annotated[Literal["reject", "skip"], Query()] = "reject",
    idempotency_key: IdempotencyKeyDep = None,
) -> DatasetPublic:
    """Upload an archive of class-named folders of images."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.upload_max_bytes + 1024 * 1024:
        raise TooLarge(f"upload of {declared} bytes exceeds the {settings.upload_max_bytes} byte limit")
    row = await run_in_threadpool(
        datasets.create_dataset,
        session,
        settings,
        tenant,
        file.file,
        file.filename or "upload",
        name,
        on_bad_file,
        idempotency_key,
    )
    return DatasetPublic.model_validate(row)


@router.get("", response_model=DatasetsPublic, operation_id="datasets-list")
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    offset: OffsetQuery = 0, limit: LimitQuery = 100
) -> DatasetsPublic:
    """List datasets, newest first."""
    rows, count = datasets.list_datasets(session, tenant, offset, limit)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic, operation_id="datasets-get",
            responses=problem_responses(404))
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    """One dataset: classes, counts and skipped files."""
    return DatasetPublic.model_validate(datasets.get_dataset(session, dataset_id, tenant))


@router.get("/{dataset_id}/samples", response_model=DatasetSamplesPublic, operation_id="datasets-samples",
            responses=problem_responses(404))
def dataset_samples(
    dataset_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    per_class: Annotated[int, Query(ge=1, le=50, description="files per class")] = 8,
) -> DatasetSamplesPublic:
    """A few image names of each class, spread over the class, to show as thumbnails."""
    row = datasets.get_dataset(session, dataset_id, tenant)
    return DatasetSamplesPublic(
        dataset_id=dataset_id,
        data=[ClassSamples(label=c, count=n, files=f) for c, n, f in datasets.sample_files(settings, row, per_class)],
    )


_JPEG: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JPEG thumbnail",
    },
}


@router.get(
    "/{dataset_id}/thumbnails/{file_path:path}",
    response_class=Response,
    responses={**_JPEG, **problem_responses(404, 503)},
    operation_id="datasets-thumbnail",
)
def dataset_thumbnail(
    dataset_id: str,
    file_path: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    size: Annotated[int, Query(ge=1, le=4096, description="longest side in pixels, clamped to 32..256")] = 96,
) -> Response:
    """A small JPEG of one stored image of the dataset (``<class>/<file>``, as samples and reports name it)."""
    row = datasets.get_dataset(session, dataset_id, tenant)
    session.close()  # decoding needs no database connection
    data = datasets.thumbnail(settings, row, file_path, size)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.delete("/{dataset_id}", status_code=204, operation_id="datasets-delete",
               responses=problem_responses(404, 409))
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> None:
    """Delete a dataset and its files (409 while a job uses it)."""
    datasets.delete_dataset(session, settings, dataset_id, tenant)
