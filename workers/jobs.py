"""What a training task does, as plain functions the Celery task (and tests) call.

A task takes a job id, claims the job with a guarded status transition, trains, stores the
artifact and records the outcome. Everything it learns is written to the database as it goes.

Every epoch also leaves a checkpoint in the artifact store, ``checkpoints/<job id>``
(``workers.checkpoints``). A worker that takes over a job whose worker died, on this host or
another, continues from it: the job's history is cut back to the checkpointed epoch and goes on
from there, so it reads as one run. The checkpoint is removed once the job succeeds, fails or is
cancelled.

A job with a ``sweep`` first searches its hyperparameters (``models.sweep.run_sweep``; every
trial shows in ``progress["sweep"]``), then trains the best recipe as above. The finished sweep
is kept in the checkpoint folder (``sweep.json``), so a worker that takes the job over goes
straight to the final training; one that dies during the sweep leaves nothing, and the sweep
starts again.

One job has one worker at a time: ``claim_job`` takes a running job over only once its
heartbeat is stale, and returns the attempt number that fences every later write
(``workers.lease``). A worker that finds its job taken over stops and writes nothing more. A job
whose workers keep dying fails after ``job_max_attempts``; one that runs past
``job_time_limit_s`` fails too. A failed job's ``error`` is one line; tracebacks go to the log.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import and_, or_, update
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

from models.budget import default_budget_applies, job_cost
from models.spec import EpochRecord, TrainSpec
from service import unpublished
from service.config import Settings, get_settings
from service.db import DatasetRow, JobRow, JobStatus, ModelRow, new_id, rowcount, session_scope, utcnow
from service.events import EPOCH, RESTART, STAGE, TRIAL, append_event, append_status, stage_data
from service.logs import log_context, tenant_var
from service.storage import KeyMissing, StoreUnavailable, join, store_for
from service.storage.mirror import mirror_for
from workers.checkpoints import JobCheckpoint
from workers.devices import training_device
from workers.lease import JobLost, Lease
from workers.leftovers import feature_spill_dir, owner_tag
from workers.metrics import observe_epoch, observe_queue_wait, worker_metrics
from workers.reconcile import WORKER_STOPPED, heartbeat_cutoff

if TYPE_CHECKING:
    from models.checkpoint import TrainState
    from models.data import ImageArray
    from models.prefix import CacheBounds
    from models.results import TrainResult
    from models.sweep import SweepResult, TrialRecord

log = logging.getLogger("zoofit.worker")


SWEEP_FILE = "sweep.json"
MODELS_PREFIX = "models"  # a model's files: models/<model id>/... in the artifact store


def claim_job(job_id: str, worker: str, *, redelivered: bool, settings: Settings) -> int | None:
    """Move a job to ``running`` if no one else holds it: the attempt number, or None (nothing to do).

    A queued job is taken; a ``running`` one only when its heartbeat is stale (its worker
    stopped), whether or not the message was redelivered: a redelivery also follows a brief
    broker disconnect or the visibility timeout while the worker lives on. The attempt number
    returned fences every later write of this worker (``workers.lease``). A job that has had
    ``job_max_attempts`` attempts already fails here instead, naming the last cause. The history
    is cleared unless the job has a checkpoint to resume from (``run_job`` cuts it back to it).
    """
    from models.checkpoint import STATE_FILE

    claimable = or_(
        JobRow.status == JobStatus.QUEUED,
        and_(JobRow.status == JobStatus.RUNNING, JobRow.heartbeat_at < heartbeat_cutoff(settings)),
    )
    gave_up, cause = False, ""
    with session_scope(settings) as s:
        job = s.get(JobRow, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping its message", job_id)
            return None
        if job.cancel_requested and job.status == JobStatus.QUEUED:
            # Guarded like the claims below: of two deliveries cancelling at once, one writes
            # the row and its events; the other finds the job cancelled.
            res = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == JobStatus.QUEUED).values(
                    status=JobStatus.CANCELLED, finished_at=utcnow(), progress={"stage": "cancelled"},
                ).execution_options(synchronize_session=False)
            )
            if rowcount(res):
                append_event(s, job_id, STAGE, {"stage": "cancelled"})
                append_status(s, job_id, JobStatus.CANCELLED, job.attempts)
            s.refresh(job)
        if job.status in JobStatus.TERMINAL:
            # E.g. cancelled through the API while re-queued after its worker died: the
            # checkpoint that worker left is of no use any more. The cancel above is committed
            # first: the store may be slow or away, and no database lock is held across it.
            s.commit()
            JobCheckpoint(settings, job_id).drop()
            return None
        # Compare-and-set on the attempt count: of two claims racing, one matches.
        guard = (JobRow.id == job_id, JobRow.attempts == job.attempts, claimable)
        now = utcnow()
        if job.attempts >= settings.job_max_attempts:
            cause = _last_cause(job)
            res = s.execute(
                update(JobRow).where(*guard).values(
                    status=JobStatus.FAILED,
                    finished_at=now,
                    error=f"gave up after {job.attempts} attempts: {cause}",
                    progress={"stage": "failed"},
                ).execution_options(synchronize_session=False)
            )
            gave_up = bool(rowcount(res))
            attempt = None
            if gave_up:
                append_event(s, job_id, STAGE, {"stage": "failed"})
                append_status(s, job_id, JobStatus.FAILED, job.attempts,
                              error=f"gave up after {job.attempts} attempts: {cause}")
        else:
            values: dict[str, Any] = {
                "status": JobStatus.RUNNING,
                "attempts": job.attempts + 1,
                "worker": worker,
                "started_at": now,
                "heartbeat_at": now,
                "progress": {"stage": "loading data"},
                "error": None,
            }
            if not JobCheckpoint(settings, job_id).exists(STATE_FILE):
                values["history"] = []
            res = s.execute(update(JobRow).where(*guard).values(**values).execution_options(synchronize_session=False))
            attempt = job.attempts + 1 if rowcount(res) else None
            if attempt is not None:
                append_status(s, job_id, JobStatus.RUNNING, attempt, worker=worker)
                append_event(s, job_id, STAGE, stage_data(values["progress"]))
                if attempt == 1:
                    observe_queue_wait(job.created_at, now)
    if gave_up:
        log.error("job %s failed: gave up after %d attempts (%s)", job_id, job.attempts, cause)
        JobCheckpoint(settings, job_id).drop()
    elif attempt is None:
        log.info("job %s is held by a live worker (%s); dropping this %s message", job_id, job.worker,
                 "redelivered" if redelivered else "duplicate")
    return attempt


def _last_cause(job: JobRow) -> str:
    """Why the job's last attempt ended without an outcome."""
    if job.status == JobStatus.RUNNING:
        return WORKER_STOPPED  # taken over here: its heartbeat is stale
    return str((job.progress or {}).get("cause") or job.error or WORKER_STOPPED)


def fail_timed_out(job_id: str, settings: Settings) -> bool:
    """Fail a job whose worker process the hard time limit killed. Returns whether it did.

    Called in the worker's main process. Only the attempt that started at least
    ``job_time_limit_s`` ago is failed: a later attempt (another worker's) is left alone.
    """
    started_before = utcnow() - timedelta(seconds=settings.job_time_limit_s)
    with session_scope(settings) as s:
        failed = s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status == JobStatus.RUNNING, JobRow.started_at <= started_before)
            .values(status=JobStatus.FAILED, finished_at=utcnow(), error=_time_limit_error(settings),
                    progress={"stage": "failed"})
            .returning(JobRow.attempts)
            .execution_options(synchronize_session=False)
        ).all()
        for (attempt,) in failed:
            append_event(s, job_id, STAGE, {"stage": "failed"})
            append_status(s, job_id, JobStatus.FAILED, attempt, error=_time_limit_error(settings))
    if not failed:
        return False
    log.error("job %s failed: the hard time limit killed its worker process", job_id)
    JobCheckpoint(settings, job_id).drop()
    return True


# The worker's own time-limit check (JobReporter.should_stop) fires this long after Celery's soft limit
# would have; the hard limit follows the soft one by service.queue.HARD_TIME_LIMIT_GRACE_S (60 s).
TIME_LIMIT_CHECK_GRACE_S = 10.0


def _time_limit_error(settings: Settings) -> str:
    limit = settings.job_time_limit_s
    return f"exceeded the time limit of {int(limit) if limit.is_integer() else limit} s"


class JobReporter:
    """Writes progress to the job record (fenced by ``lease``) and answers 'was I cancelled?' cheaply.

    Every write raises ``JobLost`` once another worker holds the job, and so does
    ``should_stop``: training unwinds at once. ``should_stop`` also raises Celery's
    ``SoftTimeLimitExceeded`` once the attempt has run ``job_time_limit_s`` (and a grace): Celery's
    own timer is best effort (celery#6873) and once let a job run past both its soft and its hard
    limit. Checked between batches only: decoding and planning rely on Celery's limits.
    """

    def __init__(self, lease: Lease, total_epochs: int, members: int) -> None:
        self.lease = lease
        self.job_id = lease.job_id
        self.settings = lease.settings
        self.total_epochs = total_epochs
        self.members = members
        self._last_check = 0.0
        self._cancelled = False
        # A grace after the limit: Celery's soft limit, when it fires, ends the job first, and its
        # signal cannot then land in the outcome's own transaction after this check's.
        self._time_limit_at = time.monotonic() + self.settings.job_time_limit_s + TIME_LIMIT_CHECK_GRACE_S
        # Kept in every progress update of this attempt, e.g. ``resumed_from``.
        self.sticky: dict[str, Any] = {}

    def _write(self, *events: tuple[str, dict[str, Any]], **values: Any) -> None:
        """A fenced update of the job with its ``events``, in one transaction."""
        with session_scope(self.settings) as s:
            self.lease.update(s, heartbeat_at=utcnow(), **values)
            for type_, data in events:
                append_event(s, self.job_id, type_, data)

    def stage(self, stage: str, *events: tuple[str, dict[str, Any]], **info: Any) -> None:
        progress = {"stage": stage, **info, **self.sticky}
        self._write((STAGE, stage_data(progress)), *events, progress=progress)

    def start_over(self) -> None:
        """Training starts from the beginning: no history yet."""
        self._write((RESTART, {"attempt": self.lease.attempt, "resumed_from": None, "history": []}), history=[])

    def resumed(self, state: TrainState) -> None:
        """Training continues from ``state``: the history is exactly the checkpoint's."""
        # Same convention as the rest of progress: 1-based member, epochs done by that member.
        self.sticky["resumed_from"] = {"member": state.member + 1, "epoch": state.epoch + 1}
        restart = {
            "attempt": self.lease.attempt,
            "resumed_from": self.sticky["resumed_from"],
            "history": [self.epoch_data(r) for r in state.history],
        }
        self._write((RESTART, restart), history=[asdict(r) for r in state.history])

    def epoch_data(self, rec: EpochRecord) -> dict[str, Any]:
        """One finished epoch as progress and the ``epoch`` event show it (member and epoch 1-based)."""
        return {
            "member": rec.member + 1,
            "members": self.members,
            "epoch": rec.epoch + 1,
            "epochs": int(rec.extra.get("epochs", self.total_epochs)),  # a shortened member's own
            "train_loss": rec.train_loss,
            "train_acc": rec.train_acc,
            "val_loss": rec.val_loss,
            "val_acc": rec.val_acc,
            "lr": rec.lr,
        }

    def sweep(
        self, record: TrialRecord, sweep: SweepResult | None = None, epoch: EpochRecord | None = None
    ) -> None:
        """A sweep trial started or ended (``sweep``: every trial so far), or finished an ``epoch``."""
        if sweep is not None:
            # Sticky: the trials stay in the progress of the final training and of the outcome.
            self.sticky["sweep"] = sweep.to_dict()
        info: dict[str, Any] = {
            "round": record.round + 1,
            "rung": record.rung + 1,
            "trial": record.trial + 1,
            "trial_epochs": record.epochs,
        }
        if epoch is not None:
            info.update(epoch=epoch.epoch + 1, val_loss=epoch.val_loss, val_acc=epoch.val_acc, lr=epoch.lr)
            _observe_epoch(epoch)
        finished = [(TRIAL, record.to_dict())] if sweep is not None and record.status != "running" else []
        self.stage("sweep", *finished, **info)

    def on_epoch(self, rec: EpochRecord) -> None:
        _observe_epoch(rec)
        with session_scope(self.settings) as s:
            job = s.get(JobRow, self.job_id)
            if not self.lease.holds(job):
                self.lease.lose()
            assert job is not None
            self._cancelled = job.cancel_requested
            epoch = self.epoch_data(rec)
            self.lease.update(
                s,
                history=[*job.history, asdict(rec)],
                progress={"stage": "training", **epoch, **self.sticky},
                heartbeat_at=utcnow(),
            )
            append_event(s, self.job_id, EPOCH, epoch)

    def should_stop(self) -> bool:
        # Called between batches: look at the database at most every second (the heartbeat
        # thread keeps the record fresh). Raises JobLost once the job is another worker's.
        self.lease.check()
        if time.monotonic() >= self._time_limit_at:
            raise SoftTimeLimitExceeded(_time_limit_error(self.settings))
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= 1.0:
            self._last_check = now
            with session_scope(self.settings) as s:
                job = s.get(JobRow, self.job_id)
                if not self.lease.holds(job):
                    self.lease.lose()
                assert job is not None
                self._cancelled = job.cancel_requested
        return self._cancelled


def _observe_epoch(rec: EpochRecord) -> None:
    throughput = rec.extra.get("train_images_per_s")
    observe_epoch(rec.seconds, float(throughput) if throughput is not None else None)


def run_job(job_id: str, *, worker: str = "local", redelivered: bool = False,
            settings: Settings | None = None) -> str | None:
    """Claim and run one training job. Returns the final status, or None if not claimed (or lost)."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    with log_context(job_id=job_id, tenant=None):
        attempt = claim_job(job_id, worker, redelivered=redelivered, settings=settings)
        if attempt is None:
            return None
        started = time.monotonic()
        with Lease(job_id, attempt, settings, worker) as lease:  # the heartbeat beats until the job ends here
            status = _run_claimed(lease)
        worker_metrics().job_duration.labels(status=status or "lost").observe(time.monotonic() - started)
        return status


def _run_claimed(lease: Lease) -> str | None:
    """Train the job ``lease`` holds and record the outcome; every write is fenced by the lease."""
    from models.artifact import save_artifact
    from models.checkpoint import STATE_FILE, save_state
    from models.data import load_folder
    from models.errors import DiskFullError, TrainingCancelled, ZooError, is_disk_full
    from models.manifest import read_manifest, without_report
    from models.sweep import with_sweep
    from models.training import TrainHooks, train
    from models.zoo import preprocess_for

    job_id, settings = lease.job_id, lease.settings
    with session_scope(settings) as s:
        job = s.get(JobRow, job_id)
        assert job is not None
        dataset = s.get(DatasetRow, job.dataset_id)
        spec_dict = dict(job.spec)
    tenant_var.set(job.tenant)  # for this attempt's log lines (run_job's log_context resets it)
    spec = TrainSpec.model_validate(spec_dict)
    reporter = JobReporter(lease, spec.epochs, spec.ensemble.members)
    model_id = new_id()
    model_key = join(MODELS_PREFIX, model_id)
    # Written on this host first (a temporary folder named after this worker), then stored.
    dest = settings.tmp_dir / f"model-{owner_tag(lease.worker)}-{model_id}"
    ckpt = JobCheckpoint(settings, job_id)
    published = False  # once the model row is committed, no error path below may remove its files

    def attempt_model() -> tuple[str | None, Path]:
        """This attempt's model: its store key while unpublished (to discard), and its local folder."""
        return (None if published else model_key), dest

    bounds = _cache_bounds(settings, lease.worker)
    started = time.perf_counter()
    try:
        device = training_device(spec.device, settings, lease.worker)  # a cuda job on no GPU fails here
        if dataset is None:
            raise ZooError(f"dataset {job.dataset_id} no longer exists")
        budget_s, default_budget = _budget(spec, settings)
        if budget_s is not None:
            result, spec = _train_budgeted(lease, spec, dataset, reporter, budget_s, default_budget, bounds, started)
        else:
            pre = preprocess_for(spec.backbone, spec.image_size)
            reporter.stage("decoding images", images=dataset.num_images, image_size=pre.image_size)
            data = load_folder(
                dataset_files(settings, dataset), list(dataset.classes), pre.image_size, pre.interpolation,
                settings.cache_dir,
                cache_tag=dataset.id, cache_max_bytes=settings.decoded_cache_max_bytes,
            )
            sweep = None
            job_spec = spec
            if spec.sweep is not None:
                sweep = _sweep(job_id, data, spec, reporter, settings, ckpt, bounds)
                assert sweep.final_spec is not None
                spec = sweep.final_spec  # the recipe trained, checkpointed and saved from here on
            resume = _resume_state(job_id, ckpt, data, spec, reporter)
            if sweep is not None:
                lease.check()
                _save_sweep(ckpt, sweep, data, job_spec)
            member, epoch = (resume.member + 1, resume.epoch + 1) if resume is not None else (1, 0)
            reporter.stage("training", member=member, members=spec.ensemble.members, epoch=epoch, epochs=spec.epochs)

            last_checkpoint = time.monotonic()

            def checkpoint(state: TrainState) -> None:
                nonlocal last_checkpoint
                # Every epoch by default; at most every checkpoint_every_s otherwise, but always at a
                # member's end (a finished member is never trained again by the worker taking over).
                if not state.member_done and time.monotonic() - last_checkpoint < settings.checkpoint_every_s:
                    return
                lease.check()  # the checkpoint is the new owner's once the job is lost
                save_state(state, ckpt.dir)  # raises DiskFullError on a full disk
                ckpt.push(STATE_FILE)
                last_checkpoint = time.monotonic()

            hooks = TrainHooks(
                on_epoch=reporter.on_epoch,
                should_stop=reporter.should_stop,
                log=lambda msg: log.info("job %s: %s", job_id, msg),
                checkpoint=checkpoint,
            )
            result = train(
                data,
                spec,
                hooks=hooks,
                device=device,
                num_threads=settings.torch_threads,
                resume=resume,
                cache=bounds,
            )
            if reporter.should_stop():
                raise TrainingCancelled("cancelled after training")
            if sweep is not None:
                result = with_sweep(result, sweep)  # the report's "sweep" section
        reporter.stage("saving model")
        try:
            # all or nothing: written in a temporary folder, then stored under a new key that only
            # the model row below publishes (a crash before it leaves objects no record names)
            save_artifact(result, spec, dest, owner=owner_tag(lease.worker))
        except Exception as exc:
            if is_disk_full(exc):
                raise DiskFullError(f"disk full while writing the model to {dest}") from exc
            raise
        # The report is stored once, in the model's manifest; the rows keep its summary.
        manifest = read_manifest(dest)
        summary = manifest["metrics"]
        lease.check()
        unpublished.reserve(settings, model_key)  # a crash before the row below leaves what a sweep removes
        store_for(settings).put_tree(model_key, dest)
        with session_scope(settings) as s:
            # Fenced first: a lost job rolls back without its model row (one model per job is
            # also a unique constraint on models.job_id).
            lease.update(
                s,
                status=JobStatus.SUCCEEDED,
                metrics=summary,
                model_id=model_id,
                progress={"stage": "done", **reporter.sticky},
                finished_at=utcnow(),
                heartbeat_at=utcnow(),
            )
            append_event(s, job_id, STAGE, stage_data({"stage": "done", **reporter.sticky}))
            append_status(s, job_id, JobStatus.SUCCEEDED, lease.attempt, model_id=model_id, metrics=summary)
            unpublished.publish(s, model_key)
            s.add(
                ModelRow(
                    id=model_id,
                    tenant=job.tenant,
                    job_id=job_id,
                    dataset_id=dataset.id,
                    classes=list(result.classes),
                    manifest=without_report(manifest),
                    metrics=summary,
                    store_key=model_key,
                )
            )
        published = True
        ckpt.drop()
        log.info("job %s succeeded: val_acc=%.4f model=%s", job_id, result.val_acc, model_id)
        return JobStatus.SUCCEEDED
    # The checkpoint goes with every outcome below, once it is recorded; anything else that
    # escapes (a worker shutting down mid-epoch) leaves it for the worker that takes the job over.
    except JobLost:
        log.warning("job %s: another worker holds it now; attempt %d stopped without writing its outcome",
                    job_id, lease.attempt)
        _discard_model(settings, *attempt_model())  # this attempt's own model, never registered
        return None
    except TrainingCancelled:
        log.info("job %s cancelled", job_id)
        return _conclude(lease, JobStatus.CANCELLED, attempt_model(), ckpt,
                         progress={"stage": "cancelled", **reporter.sticky})
    except SoftTimeLimitExceeded:
        log.warning("job %s: %s", job_id, _time_limit_error(settings))
        return _conclude(lease, JobStatus.FAILED, attempt_model(), ckpt, error=_time_limit_error(settings),
                         progress={"stage": "failed", **reporter.sticky})
    except (ZooError, ValueError) as exc:
        # A bad configuration, bad data or a full disk: record it; retrying would fail the same way.
        log.warning("job %s failed: %s", job_id, exc)
        return _conclude(lease, JobStatus.FAILED, attempt_model(), ckpt, error=f"{type(exc).__name__}: {exc}",
                         progress={"stage": "failed", **reporter.sticky})
    except (OperationalError, InterfaceError, DisconnectionError) as exc:
        # The database went away (a restart, a network blip): nothing to blame the job for, and no
        # outcome to record where it may not reach. This attempt ends here and its heartbeat stops,
        # so the job is re-queued once stale and resumes from its checkpoint (``job_max_attempts``
        # bounds how often).
        log.warning("job %s: lost the database (%s); attempt %d ends, the job resumes once re-queued",
                    job_id, exc.orig if isinstance(exc, DBAPIError) else exc, lease.attempt)
        _discard_model(settings, *attempt_model())  # this attempt's own model, never registered
        return None
    except StoreUnavailable as exc:
        # The artifact store went away (a restart, a network blip): like the database above, this
        # attempt ends without an outcome and the job resumes from its last stored checkpoint once
        # re-queued (``job_max_attempts`` bounds how often).
        log.warning("job %s: lost the artifact store (%s); attempt %d ends, the job resumes once re-queued",
                    job_id, exc, lease.attempt)
        shutil.rmtree(dest, ignore_errors=True)  # this attempt's local model folder; the store is away
        return None
    except Exception as exc:
        # The user sees one line; the traceback, with server paths, stays in the worker's log.
        log.exception("job %s crashed (attempt %d)", job_id, lease.attempt)
        return _conclude(lease, JobStatus.FAILED, attempt_model(), ckpt, error=_internal_error(exc, settings),
                         progress={"stage": "failed", **reporter.sticky})


def _budget(spec: TrainSpec, settings: Settings) -> tuple[float | None, bool]:
    """The job's time budget, if it has one, and whether it is the device's default."""
    if spec.budget_s is not None:
        return float(spec.budget_s), False
    if default_budget_applies(spec):
        device = training_device(spec.device, settings)
        cuda = device == "cuda" or (device == "auto" and _cuda_available())
        return (settings.default_budget_gpu_s if cuda else settings.default_budget_cpu_s), True
    return None, False


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _train_budgeted(
    lease: Lease, spec: TrainSpec, dataset: DatasetRow, reporter: JobReporter, budget_s: float,
    default_budget: bool, bounds: CacheBounds, started: float,
) -> tuple[TrainResult, TrainSpec]:
    """Plan the job for its budget (``models.planner``), then train the plan with a deadline.

    No checkpoint: a budgeted job is short, and one that a new worker takes over plans and
    trains again within the same budget.
    """
    from models.data import load_folder
    from models.planner import Plan, fit_budgeted
    from models.training import TrainHooks
    from models.zoo import preprocess_for

    settings = lease.settings
    job_id = lease.job_id
    reporter.stage("planning", budget_s=budget_s)

    def decode(size: int) -> ImageArray:
        pre = preprocess_for(spec.backbone, size)
        reporter.stage("decoding images", images=dataset.num_images, image_size=size, budget_s=budget_s)
        return load_folder(
            dataset_files(settings, dataset), list(dataset.classes), size, pre.interpolation, settings.cache_dir,
            cache_tag=dataset.id, cache_max_bytes=settings.decoded_cache_max_bytes,
        )

    def on_plan(planned: TrainSpec, plan: Plan) -> None:
        reporter.total_epochs, reporter.members = planned.epochs, planned.ensemble.members
        # ends_at: where the budget ends, on the wall clock (the console caps its ETA there: a plan
        # names up to MAX_MEMBERS members and the run trains those that fit).
        ends_at = utcnow() + timedelta(seconds=max(started + budget_s - time.perf_counter(), 0.0))
        reporter.sticky["plan"] = {"budget_s": budget_s, "planned": plan.planned, "kept": plan.kept,
                                   "ends_at": ends_at.isoformat()}
        reporter.start_over()
        reporter.stage("training", member=1, members=planned.ensemble.members, epoch=0, epochs=planned.epochs)

    hooks = TrainHooks(
        on_epoch=reporter.on_epoch,
        should_stop=reporter.should_stop,
        log=lambda msg: log.info("job %s: %s", job_id, msg),
    )
    result, planned = fit_budgeted(
        decode, spec, budget_s, default_budget=default_budget, device=training_device(spec.device, settings),
        num_threads=settings.torch_threads, hooks=hooks, cache=bounds,
        max_pixel_epochs=settings.job_max_pixel_epochs, started=started, on_plan=on_plan,
    )
    # The admission cap binds what the planner chose (it plans within it; this is the proof).
    cost = job_cost(planned, dataset.num_images)
    if cost.pixel_epochs > settings.job_max_pixel_epochs:
        raise ValueError(
            f"the plan trained {cost.pixel_epochs} pixel-epochs, over the cap of {settings.job_max_pixel_epochs} "
            "(ZOOFIT_JOB_MAX_PIXEL_EPOCHS): the fields the job kept do not fit it"
        )
    return result, planned


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    """The local folder of the job's checkpoint on this host (with the embedded store, the stored one)."""
    return JobCheckpoint(settings, job_id).dir


def dataset_files(settings: Settings, dataset: DatasetRow) -> Path:
    """A local folder with the dataset's images (the store's own, or this host's copy of it)."""
    from models.errors import ZooError

    try:
        return mirror_for(settings).tree(dataset.store_key)
    except KeyMissing:
        raise ZooError(f"dataset {dataset.id}: its images are missing from the store") from None


def _discard_model(settings: Settings, key: str | None, local: Path) -> None:
    """Remove a model this attempt wrote but never registered: its local folder and what it stored
    (``key``; None once the model row was committed: then its files are the model's)."""
    shutil.rmtree(local, ignore_errors=True)
    if key is not None:
        unpublished.remove(settings, key)  # with the store away, the sweep removes it later


def _conclude(
    lease: Lease, status: str, model: tuple[str | None, Path], ckpt: JobCheckpoint, *, progress: dict[str, Any],
    error: str | None = None,
) -> str | None:
    """Record the job's outcome, then remove this attempt's model (key, local folder) and the job's checkpoint.

    None if the job was lost meanwhile: its checkpoint is the new owner's then, and stays.
    """
    try:
        with session_scope(lease.settings) as s:
            values: dict[str, Any] = {"error": error} if error is not None else {}
            lease.update(s, status=status, finished_at=utcnow(), heartbeat_at=utcnow(), progress=progress, **values)
            append_event(s, lease.job_id, STAGE, stage_data(progress))
            append_status(s, lease.job_id, status, lease.attempt, error=error)
    except JobLost:
        log.warning("job %s: another worker holds it now; not recording %s", lease.job_id, status)
        return None
    finally:
        _discard_model(lease.settings, *model)
    ckpt.drop()
    return status


def _internal_error(exc: BaseException, settings: Settings) -> str:
    """One line for the user: the exception's type and first line, the data directory left out."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    for folder, name in ((settings.cache_dir, "<scratch_dir>"), (settings.data_dir, "<data_dir>")):
        where = str(folder.resolve())  # the scratch dir first: by default it is inside the data dir
        first = first.replace(where + os.sep, "").replace(where, name)
    return f"internal error: {type(exc).__name__}: {first}"[:500]


def _sweep(
    job_id: str, data: ImageArray, spec: TrainSpec, reporter: JobReporter, settings: Settings, ckpt: JobCheckpoint,
    bounds: CacheBounds,
) -> SweepResult:
    """The job's sweep: the one a previous worker finished (``sweep.json``), else run now."""
    from models.checkpoint import run_fingerprint
    from models.sweep import SweepResult, run_sweep
    from models.training import train

    ckpt.pull(SWEEP_FILE)
    stored = ckpt.dir / SWEEP_FILE
    if stored.is_file():
        try:
            saved = json.loads(stored.read_text(encoding="utf-8"))
            if saved.get("fingerprint") == run_fingerprint(data, spec):
                sweep = SweepResult.from_dict(saved["sweep"])
                if sweep.final_spec is not None:
                    log.info("job %s: the sweep finished before; training its best recipe", job_id)
                    reporter.sticky["sweep"] = sweep.to_dict()
                    return sweep
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("job %s: ignoring its stored sweep (%s)", job_id, exc)
    reporter.stage("sweep")
    sweep = run_sweep(
        data,
        spec,
        train_fn=functools.partial(
            train,
            device=training_device(spec.device, settings),
            num_threads=settings.torch_threads,
            cache=bounds,
        ),
        on_trial=lambda record, sweep: reporter.sweep(record, sweep),
        on_epoch=lambda record, rec: reporter.sweep(record, epoch=rec),
        should_stop=reporter.should_stop,
        log=lambda msg: log.info("job %s: %s", job_id, msg),
    )
    reporter.sticky["sweep"] = sweep.to_dict()  # with the last rung's outcomes, the best and the final recipe
    return sweep


def _save_sweep(ckpt: JobCheckpoint, sweep: SweepResult, data: ImageArray, spec: TrainSpec) -> None:
    """Keep the finished sweep beside the checkpoint (written whole, renamed into place, then stored)."""
    from models.checkpoint import run_fingerprint

    tmp = ckpt.dir / f".{SWEEP_FILE}.tmp"
    try:
        ckpt.dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"fingerprint": run_fingerprint(data, spec), "sweep": sweep.to_dict()}),
                       encoding="utf-8")
        os.replace(tmp, ckpt.dir / SWEEP_FILE)
        ckpt.push(SWEEP_FILE)
    except (OSError, StoreUnavailable) as exc:
        # Only a worker taking the job over needs it (to skip the sweep): not worth failing for.
        log.warning("could not keep the finished sweep in %s: %s", ckpt.key, exc)
        tmp.unlink(missing_ok=True)


def _resume_state(
    job_id: str, ckpt: JobCheckpoint, data: ImageArray, spec: TrainSpec, reporter: JobReporter
) -> TrainState | None:
    """The job's checkpoint if training can continue from it, else None; sets the history to match."""
    from models.checkpoint import STATE_FILE, CheckpointError, has_state, load_state, resume_problem

    ckpt.pull(STATE_FILE)  # the last one stored, whichever host wrote it
    if has_state(ckpt.dir):
        try:
            state = load_state(ckpt.dir)
            problem = resume_problem(state, data, spec)
        except CheckpointError as exc:
            problem = str(exc)
        if problem is None:
            log.info("job %s: resuming after member %d epoch %d", job_id, state.member + 1, state.epoch + 1)
            reporter.resumed(state)
            return state
        log.warning("job %s: not resuming from its checkpoint (%s); training from the start", job_id, problem)
        reporter.start_over()  # fenced: a lost job's checkpoint is left to its new owner
        ckpt.drop()
        return None
    reporter.start_over()
    return None


def _cache_bounds(settings: Settings, worker: str) -> CacheBounds:
    """Where the frozen-prefix feature cache may live: memory first, then spilled under this worker's
    folder in data_dir/cache/features (swept at its next start should it be killed)."""
    from models.prefix import CacheBounds

    return CacheBounds(
        memory_bytes=settings.feature_cache_memory_bytes,
        disk_bytes=settings.feature_cache_disk_bytes,
        dir=feature_spill_dir(settings, worker),
    )
