"""A job with a sweep, through the worker: trials in the job record, in the model's report, resumable."""

from __future__ import annotations

import pytest

import models.checkpoint
import models.training
from service.db import JobRow, JobStatus, session_scope
from tests.utils.data import TINY_JOB
from tests.utils.events import stream_events
from tests.utils.workers import heartbeat_stops, submit
from tests.workers.test_resume import Killed
from workers.jobs import SWEEP_FILE, checkpoint_dir, run_job

SWEEP = {"trials": 4, "eta": 2, "min_epochs": 1, "rounds": 1, "lr": [1e-4, 1e-2], "optimizers": ["adam", "sgd"]}
JOB = {**TINY_JOB, "epochs": 2, "sweep": SWEEP}




def _spy_train(monkeypatch, settings, job_id: str) -> list[tuple[dict, dict]]:
    """Record each ``train`` call's spec and the job's progress at that moment."""
    real = models.training.train
    calls: list[tuple[dict, dict]] = []

    def spy(data, spec, **kwargs):
        with session_scope(settings) as s:
            calls.append((spec.model_dump(mode="json"), dict(s.get(JobRow, job_id).progress)))
        return real(data, spec, **kwargs)

    monkeypatch.setattr(models.training, "train", spy)
    return calls


def test_sweep_job_reports_every_trial_and_trains_the_best(client, settings, monkeypatch) -> None:
    job_id = submit(client, JOB)
    calls = _spy_train(monkeypatch, settings, job_id)
    assert run_job(job_id, settings=settings) == JobStatus.SUCCEEDED

    # 4 trials of 1 epoch, the best 2 again for 2 epochs, then the final model.
    assert len(calls) == 4 + 2 + 1
    trial_calls, (final_spec, final_progress) = calls[:-1], calls[-1]
    for k, (spec, progress) in enumerate(trial_calls):
        # While a trial trains, the job says which one, at which rung, and lists the trials so far.
        assert progress["stage"] == "sweep"
        assert (progress["rung"], progress["trial_epochs"]) == ((1, 1) if k < 4 else (2, 2))
        assert spec["ensemble"]["members"] == 1 and spec["sweep"] is None
        assert len(progress["sweep"]["trials"]) == k + 1
        assert progress["sweep"]["trials"][-1]["status"] == "running"
        assert progress["sweep"]["trials"][-1]["trial"] + 1 == progress["trial"]
    assert final_progress["stage"] == "training" and len(final_progress["sweep"]["trials"]) == 6

    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["status"] == "succeeded", j["error"]
    sweep = j["metrics"]["sweep"]
    assert j["progress"]["stage"] == "done" and j["progress"]["sweep"] == sweep
    assert [(t["rung"], t["epochs"], t["status"]) for t in sweep["trials"]] == (
        [(0, 1, "done")] * 4 + [(1, 2, "done")] * 2
    )
    assert [t["outcome"] for t in sweep["trials"]].count("promoted") == 2
    assert all(t["optimizer"] in ("adam", "sgd") and 1e-4 <= t["lr"] <= 1e-2 for t in sweep["trials"])
    best = sweep["best"]
    assert best["outcome"] == "best" and best["rung"] == 1
    # The stream has each finished trial once, and stage events without the (growing) sweep summary.
    events = stream_events(client, job_id)
    trials = [d for _, t, d in events if t == "trial"]
    assert [(t["trial"], t["rung"], t["status"]) for t in trials] == [
        (t["trial"], t["rung"], t["status"]) for t in sweep["trials"]
    ]
    assert all("sweep" not in d for _, t, d in events if t == "stage")
    assert [d["epoch"] for _, t, d in events if t == "epoch"] == [1, 2]  # the final training's only
    # The history is the final training's only; the trials' epochs are in the sweep.
    assert [(h["member"], h["epoch"]) for h in j["history"]] == [(0, 0), (0, 1)]

    # The final model was trained from the best configuration, with the job's own epochs.
    assert final_spec["sweep"] is None and final_spec["epochs"] == 2
    assert final_spec["optimizer"]["lr"] == best["lr"] and final_spec["optimizer"]["name"] == best["optimizer"]
    assert final_spec["optimizer"]["weight_decay"] == best["weight_decay"]

    # The model's report (manifest) holds the sweep; its spec is the recipe trained.
    m = client.get(f"/v1/models/{j['model_id']}").json()
    assert m["metrics"]["sweep"] == sweep and m["spec"] == final_spec
    r = client.get(f"/v1/models/{j['model_id']}/report")
    assert r.status_code == 200, r.text
    assert r.json()["sweep"] == sweep
    assert not checkpoint_dir(settings, job_id).exists()


def test_a_job_taken_over_after_its_sweep_skips_it(client, settings, monkeypatch) -> None:
    job_id = submit(client, {**JOB, "sweep": {**SWEEP, "trials": 2}})
    real = models.checkpoint.save_state

    def save_state(state, directory):
        if state.epoch == 1:  # the final training's second epoch: die before its checkpoint
            raise Killed
        return real(state, directory)

    monkeypatch.setattr(models.checkpoint, "save_state", save_state)
    with pytest.raises(Killed):
        run_job(job_id, worker="w1", settings=settings)
    monkeypatch.undo()
    ckpt = checkpoint_dir(settings, job_id)
    assert (ckpt / SWEEP_FILE).is_file() and models.checkpoint.has_state(ckpt)
    before = client.get(f"/v1/jobs/{job_id}").json()["progress"]["sweep"]

    calls = _spy_train(monkeypatch, settings, job_id)
    heartbeat_stops(settings, job_id)
    assert run_job(job_id, worker="w2", redelivered=True, settings=settings) == JobStatus.SUCCEEDED
    assert len(calls) == 1 and calls[0][1]["stage"] == "training"  # no trial trained again
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["progress"]["resumed_from"] == {"member": 1, "epoch": 1}
    assert j["metrics"]["sweep"] == before and len(before["trials"]) == 2
    assert [(h["member"], h["epoch"]) for h in j["history"]] == [(0, 0), (0, 1)]
