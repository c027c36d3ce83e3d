from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, StreamingResponse

from service import exports
from service.api.deps import EnqueueExportDep, SessionDep, SettingsDep, TenantDep
from service.problems import problem_responses
from service.schemas import ExportCreate, ExportPublic, ExportsPublic
from service.storage import store_for

_CHUNK = 1024 * 1024

router = APIRouter(prefix="/models", tags=["exports"])

_ZIP = {
    200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the bundle: model file, labels.json, preprocess.json, README.md, SHA256SUMS"},
    **problem_responses(404, 409),
}


@router.post("/{model_id}/exports", response_model=ExportPublic, status_code=202, operation_id="exports-create",
             responses=problem_responses(404))
def create_export(
    model_id: str, body: ExportCreate, session: SessionDep, tenant: TenantDep, enqueue: EnqueueExportDep,
    response: Response,
) -> ExportPublic:
    """Export the model as a bundle (built by a worker); asking again returns the same export."""
    row, queued = exports.request_export(session, model_id, tenant, body.format, body.quantization, enqueue)
    if not queued and row.status == "succeeded":
        response.status_code = 200
    return ExportPublic.model_validate(exports.export_public(row))


@router.get("/{model_id}/exports", response_model=ExportsPublic, operation_id="exports-list",
            responses=problem_responses(404))
def list_exports(model_id: str, session: SessionDep, tenant: TenantDep) -> ExportsPublic:
    """The model's exports, newest first."""
    rows = exports.list_exports(session, model_id, tenant)
    return ExportsPublic(data=[ExportPublic.model_validate(exports.export_public(r)) for r in rows], count=len(rows))


@router.get("/{model_id}/exports/{export_id}", response_model=ExportPublic, operation_id="exports-get",
            responses=problem_responses(404))
def get_export(model_id: str, export_id: str, session: SessionDep, tenant: TenantDep) -> ExportPublic:
    """One export: status, error, what it measured."""
    return ExportPublic.model_validate(exports.export_public(exports.get_export(session, model_id, export_id, tenant)))


@router.get("/{model_id}/exports/{export_id}/download", response_class=Response, responses=_ZIP,
            operation_id="exports-download")
def download_export(
    model_id: str, export_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    """The export's zip bundle (409 until it has succeeded)."""
    row = exports.get_export(session, model_id, export_id, tenant)
    info, local = exports.export_file(settings, row)
    name = exports.download_name(row)
    session.close()  # a download may take long: no database connection held meanwhile
    if local is not None:
        return FileResponse(local, media_type="application/zip", filename=name)
    # From the object store, streamed through in chunks (never held whole in memory).
    body = store_for(settings).open_read(info.key)

    def chunks() -> Iterator[bytes]:
        try:
            while chunk := body.read(_CHUNK):
                yield chunk
        finally:
            body.close()

    return StreamingResponse(chunks(), media_type="application/zip", headers={
        "Content-Length": str(info.size), "Content-Disposition": f'attachment; filename="{name}"',
    })
