"""Limits a job must fit before it is recorded: its size (422) and its tenant's backlog (429).

Every message names the setting that limits and its value, and the body carries them as
``limit`` (the environment variable), ``value`` (its value) and ``actual`` (what was asked).
How a job's cost is counted is defined once, in ``models.budget``.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.budget import JobCost, job_cost
from models.spec import TrainSpec
from service.config import Settings
from service.db import DatasetRow, JobRow, JobStatus
from service.errors import TooManyRequests, Unprocessable

# Retry-After of a 429 over the queued-jobs limit: a queued job starts when one of the tenant's running
# ones ends, and a CPU job runs a minute or more (the default budget is 75 s).
QUEUE_RETRY_AFTER_S = 30


def check_class_count(settings: Settings, classes: int, what: str) -> None:
    """Refuse ``what`` (a dataset, an upload) with more than ``max_classes`` classes: 422."""
    cap = settings.max_classes
    if classes > cap:
        raise Unprocessable(
            f"{what} has {classes} classes, over the cap of {cap} (ZOOFIT_MAX_CLASSES={cap})",
            limit="ZOOFIT_MAX_CLASSES", value=cap, actual=classes,
        )


def check_job_fits(settings: Settings, dataset: DatasetRow, spec: TrainSpec) -> JobCost:
    """Refuse a job too big for this service (422): too many classes, too big decoded, too costly."""
    check_class_count(settings, len(dataset.classes), f"dataset {dataset.id!r}")
    cost = job_cost(spec, dataset.num_images)
    pixels = f"{cost.images} images x {cost.side}x{cost.side} px"
    cap = settings.decoded_max_bytes
    if cost.decoded_bytes > cap:
        raise Unprocessable(
            f"the decoded dataset would take {pixels} x 3 bytes = {cost.decoded_bytes} bytes "
            f"({_human_bytes(cost.decoded_bytes)}), over the memory budget of {cap} bytes "
            f"(ZOOFIT_DECODED_MAX_BYTES={cap}); use a smaller image_size or fewer images",
            limit="ZOOFIT_DECODED_MAX_BYTES", value=cap, actual=cost.decoded_bytes,
        )
    cap = settings.job_max_pixel_epochs
    if cost.pixel_epochs > cap:
        raise Unprocessable(
            f"the job would train {cost.pixel_epochs} pixel-epochs = {pixels} x {cost.epochs} epochs "
            f"({_epochs_text(cost)}), over the cap of {cap} (ZOOFIT_JOB_MAX_PIXEL_EPOCHS={cap}); "
            "use fewer epochs, members or sweep trials, or a smaller image_size",
            limit="ZOOFIT_JOB_MAX_PIXEL_EPOCHS", value=cap, actual=cost.pixel_epochs,
        )
    return cost


def _human_bytes(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _epochs_text(cost: JobCost) -> str:
    members = f"{cost.members} member" + ("s" if cost.members != 1 else "")
    parts = [f"{cost.final_epochs} of final training over {members}"]
    if cost.sweep_epochs:
        parts.append(f"{cost.sweep_epochs} of sweep trials")
    return ", ".join(parts)


def check_queue_room(session: Session, settings: Settings, tenant: str) -> None:
    """Refuse another job while ``tenant`` has ``tenant_max_queued_jobs`` queued ones: 429."""
    cap = settings.tenant_max_queued_jobs
    queued = session.scalar(
        select(func.count()).select_from(JobRow).where(JobRow.tenant == tenant, JobRow.status == JobStatus.QUEUED)
    ) or 0
    if queued >= cap:
        raise TooManyRequests(
            f"tenant {tenant!r} already has {queued} queued jobs, the limit (ZOOFIT_TENANT_MAX_QUEUED_JOBS={cap}); "
            "submit again once some have started or finished, or cancel some",
            limit="ZOOFIT_TENANT_MAX_QUEUED_JOBS", value=cap, actual=queued, retry_after=QUEUE_RETRY_AFTER_S,
        )
