"""The event stream of a real (tiny) training job run by ``run_job``."""

from __future__ import annotations

import pytest

from service.db import JobStatus
from tests.utils.data import TINY_JOB
from tests.utils.events import stream_events
from tests.utils.workers import submit
from workers.jobs import run_job


def test_training_job_emits_status_stages_epochs_and_done(client, settings):
    job_id = submit(client, {**TINY_JOB, "ensemble": {"members": 2}})
    assert run_job(job_id, settings=settings) == JobStatus.SUCCEEDED
    job = client.get(f"/v1/jobs/{job_id}").json()
    events = stream_events(client, job_id)

    ids = [i for i, _, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and None not in ids
    statuses = [d["status"] for _, t, d in events if t == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    running = next(d for _, t, d in events if t == "status" and d["status"] == "running")
    assert running["attempt"] == 1 and running["error"] is None
    stages = [d["stage"] for _, t, d in events if t == "stage"]
    assert stages[:3] == ["queued", "loading data", "decoding images"]
    assert "training" in stages and stages[-2:] == ["saving model", "done"]
    restart = [d for _, t, d in events if t == "restart"]
    assert restart == [{"attempt": 1, "resumed_from": None, "history": []}]

    epochs = [d for _, t, d in events if t == "epoch"]
    assert len(epochs) == len(job["history"]) == 2 * TINY_JOB["epochs"]
    for event, h in zip(epochs, job["history"], strict=True):
        assert (event["member"], event["epoch"]) == (h["member"] + 1, h["epoch"] + 1)
        assert (event["members"], event["epochs"]) == (2, TINY_JOB["epochs"])
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert event[key] == h[key]

    last_id, last_type, done = events[-1]
    assert last_type == "done"
    assert done["status"] == "succeeded" and done["model_id"] == job["model_id"] is not None
    assert done["error"] is None and done["metrics"]["val_acc"] == job["metrics"]["val_acc"]
    # Resuming after the last event: only ``done`` again (without an id), then the end.
    assert stream_events(client, job_id, last_event_id=last_id) == [(None, "done", done)]
    # Resuming in the middle: exactly the later events.
    middle = ids[len(ids) // 2]
    assert stream_events(client, job_id, last_event_id=middle) == [e for e in events if e[0] > middle]


def test_failed_job_ends_with_done_carrying_its_error(client, settings):
    import shutil

    job_id = submit(client)
    ds = client.get(f"/v1/jobs/{job_id}").json()["dataset_id"]
    shutil.rmtree(settings.datasets_dir / ds / "bird")
    assert run_job(job_id, settings=settings) == JobStatus.FAILED
    events = stream_events(client, job_id)
    assert [d["status"] for _, t, d in events if t == "status"] == ["queued", "running", "failed"]
    assert events[-1][1] == "done" and "bird" in events[-1][2]["error"] and events[-1][2]["model_id"] is None


def test_a_worker_that_lost_its_job_adds_no_events(client, settings, tmp_path):
    """Fenced like the job's columns: an attempt taken over writes no progress, epoch or outcome event."""
    from models.spec import EpochRecord
    from service.events import read_events
    from tests.utils.workers import heartbeat_stops
    from workers.checkpoints import JobCheckpoint
    from workers.jobs import JobReporter, _conclude, claim_job
    from workers.lease import JobLost, Lease

    job_id = submit(client)
    old = claim_job(job_id, "old", redelivered=False, settings=settings)
    assert old == 1
    heartbeat_stops(settings, job_id)
    assert claim_job(job_id, "new", redelivered=False, settings=settings) == 2
    before = read_events(settings, job_id, 0)

    lease = Lease(job_id, old, settings, "old")
    reporter = JobReporter(lease, total_epochs=2, members=1)
    with pytest.raises(JobLost):
        reporter.stage("training", member=1)
    lease = Lease(job_id, old, settings, "old")  # a fresh lease: each write must check by itself
    reporter = JobReporter(lease, total_epochs=2, members=1)
    with pytest.raises(JobLost):
        reporter.on_epoch(EpochRecord(0, 0, 1.0, 0.5, 1.0, 0.5, 1e-3, 0.1))
    lease = Lease(job_id, old, settings, "old")
    ckpt = JobCheckpoint(settings, job_id)
    assert _conclude(lease, JobStatus.FAILED, ("models/m", tmp_path / "m"), ckpt, progress={"stage": "failed"},
                     error="x") is None
    assert read_events(settings, job_id, 0) == before
    assert [e.data["attempt"] for e in before if e.type == "status"] == [0, 1, 2]


def test_an_epoch_shows_its_own_members_epochs():
    """A member a time budget shortened (models.training.epochs_that_fit) shows its own epochs: "4/4", not "4/5"."""
    from models.spec import EpochRecord
    from workers.jobs import JobReporter

    reporter = object.__new__(JobReporter)
    reporter.members, reporter.total_epochs = 2, 5
    shortened = EpochRecord(1, 3, 1.0, 0.5, 1.0, 0.5, 1e-3, 0.1, extra={"epochs": 4.0})
    assert (reporter.epoch_data(shortened)["epoch"], reporter.epoch_data(shortened)["epochs"]) == (4, 4)
    older = EpochRecord(0, 3, 1.0, 0.5, 1.0, 0.5, 1e-3, 0.1)  # a record from before members were shortened
    assert reporter.epoch_data(older)["epochs"] == 5
