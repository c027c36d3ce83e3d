"""The FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException

from service.api import api_router
from service.api.gate import ApiKeyGate
from service.api.openapi import finish_schema
from service.api.request_id import RequestId
from service.api.routes import health
from service.batching import MicroBatcher
from service.config import Settings, get_settings
from service.console import mount_console
from service.datasets import sweep_stale_uploads
from service.db import get_engine
from service.errors import ServiceError
from service.event_hub import EventHub
from service.limits import BodySizeLimit, RefuseNulInUrl
from service.metrics import instrument
from service.models_store import PredictorCache, model_files
from service.problems import field_errors, problem_response, validation_detail
from service.storage import KeyMissing, StoreUnavailable

log = logging.getLogger("zoofit.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        get_engine(settings)  # upgrade or check the schema (service.schema), fail fast on a bad URL
        for path in sweep_stale_uploads(settings):
            log.warning("removed a stale partial upload left by a killed process: %s", path)
        try:
            yield
        finally:
            await app.state.events.aclose()
            await app.state.batcher.aclose()

    app = FastAPI(
        title="zoofit",
        version="0.1.0",
        description="Fine-tune ImageNet backbones from the timm zoo on your images, and serve the ensembles.",
        lifespan=lifespan,
    )
    app.state.predictors = PredictorCache(
        settings.model_cache_size, device=settings.device, runtime=settings.predict_runtime,
        threads=settings.predict_threads, files=model_files(settings),
    )
    # Forward passes run on the batcher's one inference thread, which applies predict_threads
    # (torch is imported there, on the first prediction, not when the API starts).
    app.state.batcher = MicroBatcher(
        settings.predict_batch_max, settings.predict_batch_wait_ms, threads=settings.predict_threads
    )

    app.state.events = EventHub(settings)  # one poller per watched job (GET /v1/jobs/{id}/events)

    # Every error answer is a problem document (service.problems), whoever raises it.
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return problem_response(exc.status, exc.message, headers=exc.headers(), **exc.details)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc.errors())
        return problem_response(422, validation_detail(errors), errors=errors)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own answers: 404 for a path no route has, 405 for a method it lacks (with Allow).
        detail = str(exc.detail)
        if exc.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            what = "no route" if exc.status_code == 404 else "the route does not take"
            detail = f"{what} {request.method} {request.url.path}"
        return problem_response(exc.status_code, detail, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    async def _database_down(_request: Request, exc: DBAPIError) -> JSONResponse:
        # Lost connections are a 503 to retry (the pool reconnects by itself once the server is
        # back); the driver's message (host, user) goes to the log, not to the client.
        if not (isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated):
            raise exc
        log.warning("database unavailable: %s", exc.orig)
        return problem_response(
            503, "the database is unavailable; retry in a few seconds", headers={"Retry-After": "5"}
        )

    @app.exception_handler(KeyMissing)
    async def _object_gone(_request: Request, exc: KeyMissing) -> JSONResponse:
        # Removed between its record's read and its own (a delete at the same moment).
        return problem_response(404, "not found: it was deleted while this request read it")

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        # The bucket's address and the cause go to the log; nothing was published (service.unpublished).
        log.warning("artifact store unavailable: %s", exc)
        return problem_response(
            503, "the artifact store is unavailable; retry in a few seconds", headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette logs the exception and re-raises it after this answer is sent.
        return problem_response(500, "an unexpected error occurred; the API log has the cause")

    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI's schema, finished for clients (service.api.openapi), built once and cached.
        if app.openapi_schema is None:
            app.openapi_schema = finish_schema(fastapi_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    slack = 1024 * 1024  # multipart framing and form fields

    def body_limit(path: str) -> int:
        if path.startswith("/v1/datasets"):
            return settings.upload_max_bytes + slack
        if path.endswith("/predict"):
            return settings.predict_max_bytes + slack
        return slack

    # The last added runs first: request id (and access log), HTTP metrics, NUL check, then the API
    # key, then the body cap; none reads the body.
    app.add_middleware(BodySizeLimit, limit_for=body_limit)
    app.add_middleware(ApiKeyGate, settings=settings)
    app.add_middleware(RefuseNulInUrl)
    instrument(app, settings)  # GET /metrics, and the HTTP metrics' middleware
    app.add_middleware(RequestId)
    app.include_router(health.router)
    app.include_router(api_router)
    mount_console(app)
    return app
