"""Prometheus metrics of the API process, and its ``GET /metrics``.

- HTTP: prometheus-fastapi-instrumentator, per route template (``/v1/jobs/{job_id}``, never a raw
  id), in a registry of the app's own: ``http_requests_total``, ``http_request_duration_seconds``,
  ``http_request_size_bytes``, ``http_response_size_bytes``. ``/metrics`` itself is not counted. A
  request's duration ends when its response starts: a job's event stream, open for the job's whole
  life, would otherwise blur the latencies.
- Jobs by status: ``zoofit_jobs{status}``, one grouped ``SELECT status, count(*)`` per scrape.
- Prediction (``service.batching``): ``zoofit_predict_batch_images`` (images per forward pass) and
  ``zoofit_predict_batch_seconds`` (its latency); model cache (``service.models_store``):
  ``zoofit_model_cache_hits_total`` and ``zoofit_model_cache_misses_total``. Process-wide, in
  prometheus_client's default registry (with its ``process_*`` and ``python_*`` metrics).

The training figures come from the workers, which serve their own (``workers.metrics``).

``/metrics`` is outside ``/v1`` and needs no API key: scrape it on the private network, or set
``ZOOFIT_METRICS_TOKEN`` and give the scraper that bearer token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from service.config import Settings
from service.problems import problem_response

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("zoofit.metrics")

METRICS_PATH = "/metrics"
# Handlers (route templates) the HTTP metrics leave out: the scrape itself.
UNCOUNTED_HANDLERS = (f"^{METRICS_PATH}$",)

PREDICT_BATCH_IMAGES = Histogram(
    "zoofit_predict_batch_images", "images in one forward pass of the predict micro-batcher",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PREDICT_BATCH_SECONDS = Histogram(
    "zoofit_predict_batch_seconds", "duration of one forward pass of the predict micro-batcher",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MODEL_CACHE_HITS = Counter("zoofit_model_cache_hits", "predictions whose model was loaded already")
MODEL_CACHE_MISSES = Counter("zoofit_model_cache_misses", "predictions that loaded their model first")


class JobsByStatus(Collector):
    """``zoofit_jobs{status}``: jobs in each status, counted at scrape time by one grouped query."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("zoofit_jobs", "jobs in each status (all tenants)", labels=["status"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from service.db import JobRow, JobStatus, new_session

        try:
            with new_session(self.settings) as session:
                query = select(JobRow.status, func.count()).group_by(JobRow.status)
                counts: dict[str, int] = {status: n for status, n in session.execute(query)}
        except Exception as exc:  # a scrape must not fail over the database: the other metrics still count
            log.warning("metrics: cannot count jobs by status: %s", exc)
            return
        family = GaugeMetricFamily("zoofit_jobs", "jobs in each status (all tenants)", labels=["status"])
        for status in (*JobStatus.ALL, *sorted(set(counts) - set(JobStatus.ALL))):
            family.add_metric([status], counts.get(status, 0))
        yield family


def instrument(app: FastAPI, settings: Settings) -> None:
    """HTTP metrics for ``app`` and its ``GET /metrics`` (add it after the app's other middlewares)."""
    from prometheus_fastapi_instrumentator import Instrumentator

    registry = CollectorRegistry()  # per app: tests build many apps in one process
    registry.register(JobsByStatus(settings))
    Instrumentator(
        excluded_handlers=list(UNCOUNTED_HANDLERS), should_exclude_streaming_duration=True, registry=registry
    ).instrument(app)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    @app.get(METRICS_PATH, include_in_schema=False, operation_id="metrics-scrape")
    def metrics(request: Request) -> Response:
        """Prometheus text format: this app's HTTP and job metrics, then the process-wide ones."""
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return problem_response(401, "GET /metrics needs 'Authorization: Bearer <ZOOFIT_METRICS_TOKEN>'")
        return Response(generate_latest(registry) + generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
