"""Dependencies as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.config import Settings, get_settings
from service.db import session_scope
from service.jobs import Enqueue, celery_enqueue
from service.models_store import PredictorCache


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_scope(settings) as session:
        yield session


def get_predictors(request: Request) -> PredictorCache:
    return request.app.state.predictors  # type: ignore[no-any-return]


def get_enqueue() -> Enqueue:
    return celery_enqueue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
PredictorsDep = Annotated[PredictorCache, Depends(get_predictors)]
EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
