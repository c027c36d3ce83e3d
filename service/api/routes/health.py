from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from service.api.deps import SettingsDep
from service.config import Settings
from service.db import get_engine
from service.problems import problem_responses
from service.queue import get_celery

# No key needed here, but the URL and body checks of service.limits still apply.
router = APIRouter(tags=["health"], responses=problem_responses(400, 413))
log = logging.getLogger("zoofit.api")


@router.get("/healthz", operation_id="health-live")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


class Readiness(BaseModel):
    """Each dependency's state; a probe reads it as it is, so a 503 here is this body, not a problem."""

    status: Literal["ok", "unavailable"]
    database: str
    broker: str


_READY: dict[int | str, dict[str, Any]] = {503: {"model": Readiness, "description": "a dependency is unreachable"}}


# The route is unauthenticated: it says which dependency is down, never its address or the
# driver's message (host, port, user); those go to the API's log.
_DOWN = "error: unreachable (the API log has the cause)"


def _check(settings: Settings) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception:
        log.warning("readyz: the database is unreachable", exc_info=True)
        checks["database"] = _DOWN
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception:
        log.warning("readyz: the broker is unreachable", exc_info=True)
        checks["broker"] = _DOWN
    return checks


@router.get("/readyz", operation_id="health-ready", response_model=Readiness, responses=_READY)
async def readyz(settings: SettingsDep) -> JSONResponse:
    """Database and broker are reachable."""
    checks = await run_in_threadpool(_check, settings)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)
