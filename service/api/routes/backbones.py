from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from models.spec import BACKBONES
from service.schemas import BackbonePublic, BackbonesPublic

router = APIRouter(prefix="/backbones", tags=["backbones"])


@lru_cache(maxsize=1)
def _cards() -> list[BackbonePublic]:
    from models.zoo import backbone_card

    return [BackbonePublic.model_validate(backbone_card(name)) for name in BACKBONES]


@router.get("", response_model=BackbonesPublic, operation_id="backbones-list")
async def list_backbones() -> BackbonesPublic:
    """The model zoo: parameters, input size, preprocessing and weight sources available here."""
    cards = await run_in_threadpool(_cards)
    return BackbonesPublic(data=cards, count=len(cards))
