"""The one settings object for the API, the workers and the CLI.

Everything is read from the environment with the ``ZOOFIT_`` prefix (or a ``.env`` file).
With nothing set, zoofit runs embedded: SQLite for records, kombu's SQLAlchemy transport on
SQLite as the Celery broker, and a local data directory. Production points the same code at
PostgreSQL and Redis by URL.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZOOFIT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        Path("zoofit-data"),
        description="the embedded deployment's folder: SQLite files, and the artifact store and scratch "
        "unless storage_url and scratch_dir say otherwise",
    )
    # artifact store (service.storage): datasets, models, exports, job checkpoints, addressed by keys
    storage_url: str | None = Field(
        None, description="where artifacts live: s3://bucket/prefix (an S3-compatible store) or "
        "file:///path; default: data_dir itself (one host, or a folder every host mounts at the same path)",
    )
    s3_endpoint_url: str | None = Field(
        None, description="the S3 API's address for a store that is not AWS (MinIO: http://minio:9000)"
    )
    s3_region: str | None = Field(None, description="the bucket's region (AWS); most other stores ignore it")
    s3_access_key_id: str | None = Field(None, description="default: boto3's own lookup (env, profile, role)")
    s3_secret_access_key: SecretStr | None = Field(None, description="goes with s3_access_key_id")
    s3_transfer_threads: int = Field(
        16, ge=1, le=256, description="objects uploaded or downloaded at once when a whole tree moves"
    )
    unpublished_after_s: float = Field(
        6 * 3600.0, gt=0, description="objects written to the store but never published by their record "
        "(the writer died) are removed this long after their upload began (service.unpublished)",
    )
    # per-host scratch: local copies of stored trees, decoded images, feature-cache spill, uploads in flight
    scratch_dir: Path | None = Field(
        None, description="this host's scratch folder (never shared between hosts); default: data_dir/cache"
    )
    scratch_max_bytes: int = Field(
        20 * 1024**3, ge=0, description="local copies of stored datasets and models kept in scratch_dir "
        "(with an object store): most bytes, least recently used removed first",
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite in data_dir")
    broker_url: str | None = Field(None, description="Celery broker; default embedded SQLite broker")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    auth_enabled: bool = Field(
        True, description="require 'Authorization: Bearer <key>' on /v1; turn off only for local single-user use"
    )

    # uploads
    upload_max_bytes: int = Field(512 * 1024**2, ge=1, description="compressed archive size cap")
    extract_max_bytes: int = Field(2 * 1024**3, ge=1, description="uncompressed archive size cap")
    extract_max_files: int = Field(50_000, ge=1)
    extract_max_ratio: float = Field(200.0, gt=1.0)
    max_image_pixels: int = Field(40_000_000, ge=1)

    # prediction
    predict_max_images: int = Field(64, ge=1)
    predict_max_bytes: int = Field(64 * 1024**2, ge=1)
    predict_max_top_k: int = Field(20, ge=1)
    model_cache_size: int = Field(4, ge=1, description="trained models kept loaded in memory")
    predict_batch_max: int = Field(
        32, ge=1, description="images of concurrent requests predicted together at most (1: no batching); the "
        "model runs them in chunks sized for the device (models.runtime.inference_batch)"
    )
    predict_batch_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="how long a request waits for others to share its forward pass"
    )
    predict_threads: int | None = Field(
        None, ge=1, description="intra-op threads of the API's inference thread; default: all usable cores"
    )

    # workers
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads; default: all cores")
    feature_cache_memory_bytes: int = Field(
        2 * 1024**3, ge=0, description="frozen-prefix feature cache: the most a job keeps in memory"
    )
    feature_cache_disk_bytes: int = Field(
        16 * 1024**3, ge=0, description="frozen-prefix feature cache: the most a job spills to the scratch dir"
    )
    worker_concurrency: int = Field(
        1, ge=1, description="jobs a worker trains at once; on a GPU each holds its own memory: plan on about "
        "8 GiB a job at the default batch and image size (an estimate: docs/operations.md, 'Queues by device')",
    )
    checkpoint_every_s: float = Field(
        0.0, ge=0, description="a running job's checkpoint is stored at most this often (0: after every epoch) "
        "and after every finished member; a longer period trades store bandwidth (docs/scaling.md) for the "
        "epochs a worker taking the job over trains again",
    )
    worker_queues: str | None = Field(
        None, description="the queues a worker consumes, comma-separated, instead of the ones its hardware "
        "serves: train (jobs with device 'any') and export on every worker, plus train-cuda on a GPU worker "
        "(ZOOFIT_DEVICE=cuda, or auto with a GPU) or train-cpu on any other; e.g. 'train-cuda' for a GPU host "
        "kept for cuda jobs (service.queue.worker_queues)",
    )
    worker_heartbeat_s: float = Field(30.0, gt=0, description="a running job's record is touched this often")
    requeue_after_s: float = Field(
        600.0, gt=0, description="a job queued this long without starting is sent again (lost broker message)"
    )
    max_dataset_pixels: int = Field(
        10_000_000_000, ge=1,
        description="uploads: most pixels (width x height, from headers) of all a dataset's images together",
    )

    # prediction: decoding (each decoded image takes up to 4 bytes a pixel until it is resized)
    predict_max_request_pixels: int = Field(
        400_000_000, ge=1,
        description="most pixels (width x height, read from the headers) of a predict request's images together",
    )
    predict_decode_slots: int = Field(
        2, ge=1, description="most images decoding at once in the API process, across all predict requests"
    )
    predict_decode_wait_s: float = Field(
        30.0, gt=0, description="how long a predict image may wait for a decoding slot before the request is a 503"
    )
    # dataset thumbnails (the console): decoded apart from predict's slots, then kept in memory
    thumbnail_slots: int = Field(
        1, ge=1, description="most dataset thumbnails decoding at once in the API process (not predict's slots)"
    )
    thumbnail_wait_s: float = Field(
        1.0, gt=0, description="how long a thumbnail may wait for its decoding slot before it is a 503 (Retry-After)"
    )
    thumbnail_cache_max_bytes: int = Field(
        32 * 1024**2, ge=0, description="thumbnails kept in the API process's memory, least recently used dropped first"
    )
    decoded_cache_max_bytes: int = Field(
        8 * 1024**3, ge=0,
        description="decoded-image cache under data_dir/cache: most bytes kept, least recently used removed first",
    )
    idempotency_ttl_s: float = Field(
        24 * 3600.0, gt=0, description="how long an Idempotency-Key names its first result; later it is a new request"
    )
    job_max_attempts: int = Field(
        3, ge=1, description="a job whose worker stopped this many times fails instead of starting again"
    )
    job_time_limit_s: float = Field(
        24 * 3600.0, gt=0, description="a job still running after this long fails (Celery's soft time limit)"
    )

    # time budgets (models.planner): a job that sets no training field and no budget_s gets one
    default_budget_cpu_s: float = Field(
        75.0, ge=3, le=86_400,
        description="budget_s of a plain {dataset_id} job on a CPU worker (the planner measures and plans for it)",
    )
    default_budget_gpu_s: float = Field(
        300.0, ge=3, le=86_400, description="budget_s of a plain {dataset_id} job on a GPU worker"
    )

    # quotas and job size caps (service.quotas, service.admission, models.budget)
    tenant_max_running_jobs: int = Field(
        2, ge=1, description="jobs of one tenant in the broker or running at once; its others wait their turn"
    )
    tenant_max_queued_jobs: int = Field(
        20, ge=1, description="queued jobs of one tenant (sent or waiting); another submission is 429"
    )
    job_max_pixel_epochs: int = Field(
        10**12, ge=1, description="one job's cost: images x side^2 x epochs (members, sweep trials); more is 422"
    )
    decoded_max_bytes: int = Field(
        8 * 1024**3, ge=1, description="a job's decoded dataset: images x side^2 x 3 bytes; more is 422"
    )
    max_classes: int = Field(1000, ge=2, description="classes of a dataset, at upload and at job submission")
    predict_runtime: Literal["torch", "onnxruntime"] = Field(
        "onnxruntime",
        description="what runs predict's forward passes on the CPU: onnxruntime (the ensemble exported to ONNX on "
        "first load, cached in the model folder; measured faster here, see BENCHMARKS.md) or torch eager",
    )

    # job event streams (GET /v1/jobs/{id}/events; service.event_hub)
    events_poll_s: float = Field(
        0.5, gt=0, le=60, description="how often an API process reads a watched job's new events (one query per job)"
    )
    events_ping_s: float = Field(
        15.0, gt=0, description="an idle event stream gets a ': ping' comment this often (keeps proxies open)"
    )
    events_queue_max: int = Field(
        256, ge=1, description="events buffered per stream; a client that falls this far behind is disconnected"
    )
    events_max_streams: int = Field(
        1000, ge=1, description="open event streams per API process; one more is a 503"
    )
    events_max_streams_per_tenant: int = Field(
        100, ge=1, description="open event streams of one tenant per API process; one more is a 429"
    )

    # connections to a server database, per process (an API process, a worker's main and pool processes)
    db_pool_size: int = Field(
        5, ge=1, le=1000, description="connections a process keeps open to PostgreSQL (SQLAlchemy's pool); "
        "every process of every host counts against the server's max_connections (docs/scaling.md)",
    )
    db_max_overflow: int = Field(10, ge=0, le=1000, description="connections a process may open beyond db_pool_size")

    # schema migrations (service.schema; `zoofit db upgrade`)
    db_auto_upgrade: bool | None = Field(
        None, description="the API and workers upgrade the database schema themselves at start; "
        "default: yes on SQLite (embedded), no on PostgreSQL (run `zoofit db upgrade`; they refuse to start if behind)",
    )

    # observability (service.metrics, service.logs)
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text (for a terminal) or as JSON objects (for a log collector)"
    )
    metrics_token: SecretStr | None = Field(
        None, description="if set, GET /metrics needs 'Authorization: Bearer <token>'; "
        "unset: /metrics is open (scrape it on the private network only)",
    )
    worker_metrics_port: int = Field(
        9540, ge=0, le=65535, description="a worker serves its Prometheus metrics on this port (0: not at all)"
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="address of the worker's metrics server (0.0.0.0 for a scraper on another host)"
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'zoofit.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_db_auto_upgrade(self) -> bool:
        if self.db_auto_upgrade is not None:
            return self.db_auto_upgrade
        return self.resolved_database_url.startswith("sqlite")

    @property
    def embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("sqla+")

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        """This host's scratch folder (``scratch_dir``): local copies, decoded images, feature spill."""
        return self.scratch_dir if self.scratch_dir is not None else self.data_dir / "cache"

    @property
    def tmp_dir(self) -> Path:
        """Uploads and artifacts being written, on this host (renamed or uploaded into the store)."""
        return self.cache_dir / "tmp"

    def ensure_dirs(self) -> None:
        local_store = (self.datasets_dir, self.models_dir) if self.storage_url is None else ()
        for d in (self.data_dir, *local_store, self.cache_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
