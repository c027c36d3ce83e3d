from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import SettingsDep
from service.config import Settings
from service.db import get_engine
from service.queue import get_celery

router = APIRouter(tags=["health"])
log = logging.getLogger("zoofit.api")


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


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


@router.get("/readyz")
async def readyz(settings: SettingsDep) -> JSONResponse:
    """Database and broker are reachable."""
    checks = await run_in_threadpool(_check, settings)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)
