from __future__ import annotations

from fastapi import APIRouter

from service.presets import PRESETS
from service.schemas import PresetPublic, PresetsPublic

router = APIRouter(prefix="/presets", tags=["presets"])


@router.get("", response_model=PresetsPublic, operation_id="presets-list")
def list_presets() -> PresetsPublic:
    """Named starting recipes (fast, balanced, best): a partial job to submit with a dataset_id."""
    data = [PresetPublic(name=p.name, title=p.title, description=p.description, job=p.job) for p in PRESETS.values()]
    return PresetsPublic(data=data, count=len(data))
