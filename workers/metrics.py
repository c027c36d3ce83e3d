"""Prometheus metrics of the training workers, and the server a worker exports them on.

- ``zoofit_job_queue_wait_seconds``: submitted (the job's ``created_at``) to started, on its first attempt
- ``zoofit_job_duration_seconds{status}``: one attempt, claimed to outcome (``succeeded``, ``failed``,
  ``cancelled``, or ``lost`` when another worker took the job over or the database went away)
- ``zoofit_epoch_duration_seconds`` and ``zoofit_train_images_per_second``: each epoch trained (sweep
  trials' too), and its training throughput; ``zoofit_epochs_total`` counts them

A Celery worker runs its tasks in forked pool processes (prefork: the hard time limit needs a
process it can kill), so the figures are observed in children while the server runs in the main
process. prometheus_client's multiprocess mode joins them: :func:`serve_worker_metrics` (the
``worker_init`` signal, before the pool forks) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory, every process writes its values to files there, and the main process's server sums
them on each scrape. The metric objects are made on first use (:func:`worker_metrics`), after
that, so they are the multiprocess kind. A process that imports this module without a server (a
test calling ``run_job``) keeps them in its default registry.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from service.config import Settings

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

log = logging.getLogger("zoofit.worker")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client itself


@dataclass(frozen=True)
class WorkerMetrics:
    queue_wait: Histogram
    job_duration: Histogram
    epoch_duration: Histogram
    images_per_second: Histogram
    epochs: Counter


@functools.cache
def worker_metrics() -> WorkerMetrics:
    from prometheus_client import REGISTRY, Counter, Histogram

    # Multiprocess mode reads the values from files: the objects need no registry (and making them
    # again after serve_worker_metrics must not register a name twice).
    registry = None if os.environ.get(MULTIPROC_ENV) else REGISTRY
    return WorkerMetrics(
        queue_wait=Histogram(
            "zoofit_job_queue_wait_seconds", "time from a job's submission to the start of its first attempt",
            buckets=(0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400), registry=registry,
        ),
        job_duration=Histogram(
            "zoofit_job_duration_seconds", "one attempt at a job, from its claim to its outcome", ["status"],
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400), registry=registry,
        ),
        epoch_duration=Histogram(
            "zoofit_epoch_duration_seconds", "one training epoch (training and validation)",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=registry,
        ),
        images_per_second=Histogram(
            "zoofit_train_images_per_second", "training throughput of one epoch (images/s)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000), registry=registry,
        ),
        epochs=Counter("zoofit_epochs", "training epochs finished", registry=registry),
    )


def observe_queue_wait(created_at: datetime, started_at: datetime) -> None:
    if created_at.tzinfo is None:  # SQLite hands back naive UTC
        created_at = created_at.replace(tzinfo=UTC)
    worker_metrics().queue_wait.observe(max(0.0, (started_at - created_at).total_seconds()))


def observe_epoch(seconds: float, images_per_second: float | None) -> None:
    m = worker_metrics()
    m.epochs.inc()
    m.epoch_duration.observe(seconds)
    if images_per_second is not None:
        m.images_per_second.observe(images_per_second)


def serve_worker_metrics(settings: Settings) -> str | None:
    """In the worker's main process, before the pool forks: multiprocess mode and the metrics server.

    Returns the multiprocess directory (removed by :func:`stop_worker_metrics`), or None when
    ``worker_metrics_port`` is 0. A port in use is logged, not fatal: training matters more.
    """
    if settings.worker_metrics_port == 0:
        return None
    directory = tempfile.mkdtemp(prefix="zoofit-worker-metrics-")  # fresh: no counts of an earlier run
    os.environ[MULTIPROC_ENV] = directory  # inherited by the pool's children
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values

    values.ValueClass = values.get_value_class()  # prometheus_client was imported before the variable was set
    worker_metrics.cache_clear()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
    except OSError as exc:
        log.error("worker metrics: cannot listen on %s:%d (%s); this worker exports no metrics",
                  settings.worker_metrics_host, settings.worker_metrics_port, exc)
        return directory
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    return directory


def pool_process_exited(pid: int) -> None:
    """A pool process exited: drop its live-gauge files (counters and histograms keep counting)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def stop_worker_metrics(directory: str | None) -> None:
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
