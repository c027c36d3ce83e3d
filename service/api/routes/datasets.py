from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from service import datasets
from service.api.deps import IdempotencyKeyDep, LimitQuery, OffsetQuery, SessionDep, SettingsDep, TenantDep
from service.errors import TooLarge
from service.problems import problem_responses
from service.schemas import DatasetPublic, DatasetsPublic

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


@router.delete("/{dataset_id}", status_code=204, operation_id="datasets-delete",
               responses=problem_responses(404, 409))
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> None:
    """Delete a dataset and its files (409 while a job uses it)."""
    datasets.delete_dataset(session, settings, dataset_id, tenant)
