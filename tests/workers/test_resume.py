"""A job whose worker died resumes from its checkpoint; a full disk fails a job cleanly."""

from __future__ import annotations

import errno

import pytest
import safetensors
import safetensors.torch
from sqlalchemy import update

import models.checkpoint
from models.checkpoint import STATE_FILE, has_state
from service.db import JobRow, JobStatus, session_scope
from tests.utils.data import TINY_JOB
from tests.utils.workers import heartbeat_stops, submit
from workers.jobs import checkpoint_dir, claim_job, run_job

JOB = {**TINY_JOB, "epochs": 4}


class Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` in the worker catches it."""




def _metrics(history: list[dict]) -> list[tuple]:
    # A record without its wall times.
    return [(h["member"], h["epoch"], h["train_loss"], h["train_acc"], h["val_loss"], h["val_acc"], h["lr"])
            for h in history]


def _die_before_checkpoint(monkeypatch, member: int, epoch: int) -> None:
    """The worker dies after reporting ``(member, epoch)`` but before its checkpoint is written."""
    real = models.checkpoint.save_state

    def save_state(state, directory):
        if (state.member, state.epoch) == (member, epoch):
            raise Killed
        return real(state, directory)

    monkeypatch.setattr(models.checkpoint, "save_state", save_state)


@pytest.mark.parametrize("members", [1, 2])
def test_job_resumes_from_its_checkpoint_as_one_run(client, settings, monkeypatch, members) -> None:
    job_id = submit(client, {**JOB, "ensemble": {"members": members}})
    dies_at = (members - 1, 2)  # the last member's third epoch
    _die_before_checkpoint(monkeypatch, *dies_at)
    with pytest.raises(Killed):
        run_job(job_id, worker="w1", settings=settings)
    monkeypatch.undo()

    before = client.get(f"/v1/jobs/{job_id}").json()
    assert before["status"] == "running" and before["attempts"] == 1
    done_before = (members - 1) * 4 + 3
    assert len(before["history"]) == done_before  # epoch 2 reached the record, not the checkpoint
    assert has_state(checkpoint_dir(settings, job_id))

    # The message comes back (the broker saw the worker die): another worker takes the job over
    # once the dead worker's heartbeat is stale.
    assert run_job(job_id, worker="w2", redelivered=True, settings=settings) is None  # not yet
    heartbeat_stops(settings, job_id)
    assert run_job(job_id, worker="w2", redelivered=True, settings=settings) == JobStatus.SUCCEEDED
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["status"] == "succeeded" and j["attempts"] == 2
    assert j["progress"] == {"stage": "done", "resumed_from": {"member": members, "epoch": 2}}
    assert [(h["member"], h["epoch"]) for h in j["history"]] == [(m, e) for m in range(members) for e in range(4)]
    # The kept epochs are the first worker's, and the epoch it lost comes out the same again.
    assert _metrics(j["history"][:done_before]) == _metrics(before["history"])
    assert not checkpoint_dir(settings, job_id).exists()
    assert (settings.models_dir / j["model_id"] / "model.safetensors").exists()


def test_unreadable_checkpoint_means_a_fresh_start(client, settings) -> None:
    job_id = submit(client, JOB)
    directory = checkpoint_dir(settings, job_id)
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    stale = [{"member": 0, "epoch": e, "train_loss": 9.0, "train_acc": 0.0, "val_loss": 9.0, "val_acc": 0.0,
              "lr": 0.1, "seconds": 1.0, "extra": {}} for e in range(3)]
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(history=stale, attempts=1))

    assert run_job(job_id, worker="w2", redelivered=True, settings=settings) == JobStatus.SUCCEEDED
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert [h["epoch"] for h in j["history"]] == [0, 1, 2, 3]
    assert all(h["train_loss"] != 9.0 for h in j["history"])
    assert "resumed_from" not in j["progress"] and j["attempts"] == 2
    assert not directory.exists()


def test_claim_keeps_history_only_with_a_checkpoint(client, settings) -> None:
    job_id = submit(client, JOB)
    record = {"member": 0, "epoch": 0, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5,
              "lr": 0.1, "seconds": 1.0, "extra": {}}
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(history=[record]))
    directory = checkpoint_dir(settings, job_id)
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_bytes(b"placeholder")
    assert claim_job(job_id, "w1", redelivered=False, settings=settings)
    assert client.get(f"/v1/jobs/{job_id}").json()["history"] == [record]

    (directory / STATE_FILE).unlink()
    heartbeat_stops(settings, job_id)
    assert claim_job(job_id, "w2", redelivered=True, settings=settings)
    assert client.get(f"/v1/jobs/{job_id}").json()["history"] == []


def test_cancelled_while_requeued_drops_its_checkpoint(client, settings) -> None:
    job_id = submit(client, JOB)
    directory = checkpoint_dir(settings, job_id)
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_bytes(b"placeholder")
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert run_job(job_id, settings=settings) is None
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert not directory.exists()


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_no_space(*_args, **_kwargs):
    # What safetensors really raises on a full disk: the OS error survives only in the message.
    raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    ("target", "writer", "what"),
    [
        (models.checkpoint, "_write", "the training checkpoint"),
        (safetensors.torch, "save_file", "the model"),  # models.artifact writes through it
    ],
    ids=["checkpoint", "model"],
)
def test_full_disk_fails_the_job_with_a_clear_error(client, settings, monkeypatch, target, writer, what) -> None:
    job_id = submit(client, {**JOB, "epochs": 1})
    monkeypatch.setattr(target, writer, _no_space if writer == "_write" else _safetensors_no_space)

    assert run_job(job_id, settings=settings) == JobStatus.FAILED
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["status"] == "failed" and j["model_id"] is None
    assert j["error"].startswith(f"DiskFullError: disk full while writing {what}"), j["error"]
    assert "Traceback" not in j["error"]
    assert list(settings.models_dir.iterdir()) == []  # no model, not even a temporary folder
    assert client.get("/v1/models").json()["count"] == 0
    assert not checkpoint_dir(settings, job_id).exists()


EVERY_EPOCH = [(m, e) for m in range(2) for e in range(4)]


@pytest.mark.parametrize(("every_s", "stored"), [("0", EVERY_EPOCH), ("3600", [(0, 3), (1, 3)])])
def test_checkpoints_are_stored_at_most_every_checkpoint_every_s_and_at_each_members_end(
    make_settings, monkeypatch, every_s, stored
) -> None:
    from tests.conftest import api_client

    settings = make_settings(checkpoint_every_s=every_s)
    saved: list[tuple[int, int]] = []
    real = models.checkpoint.save_state

    def save_state(state, directory):
        saved.append((state.member, state.epoch))
        return real(state, directory)

    monkeypatch.setattr(models.checkpoint, "save_state", save_state)
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client, {**JOB, "ensemble": {"members": 2}})
        assert run_job(job_id, settings=settings) == JobStatus.SUCCEEDED
    assert saved == stored
