"""A killed worker's scratch (feature-cache spill, unfinished model folders) goes at its next start."""

from __future__ import annotations

from types import SimpleNamespace

from tests.utils.data import TINY_JOB, animals_zip
from workers.celery_app import _start_reconciler
from workers.jobs import run_job
from workers.leftovers import feature_spill_dir, owner_tag, sweep_leftovers


def _leave(settings, worker: str) -> list:
    tag = owner_tag(worker)
    spill = feature_spill_dir(settings, worker) / "features-abc"
    spill.mkdir(parents=True)
    (spill / "train-0.npy").write_bytes(b"x" * 1000)
    tmp = settings.models_dir / f".m1.{tag}.q1w2.tmp"
    old = settings.models_dir / f".m2.{tag}.e3r4.old"
    for d in (tmp, old):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x")
    return [spill.parent, tmp, old]


def test_a_worker_start_sweeps_its_own_leftovers_only(settings, monkeypatch) -> None:
    mine = _leave(settings, "celery@host-a")
    theirs = _leave(settings, "celery@host-b")
    finished = settings.models_dir / "m3"
    finished.mkdir()
    started: list = []
    monkeypatch.setattr("workers.reconcile.start_reconciler", lambda *a: started.append(a))
    _start_reconciler(sender=SimpleNamespace(hostname="celery@host-a"))
    assert not any(p.exists() for p in mine)
    assert all(p.exists() for p in theirs) and finished.exists()  # another live worker's, a real model
    assert started  # and the reconciler still starts
    assert sweep_leftovers(settings, "celery@host-a") == []


def test_a_job_writes_its_scratch_under_its_workers_name(client, settings, monkeypatch) -> None:
    import models.artifact
    import models.training

    seen: dict = {}
    real_save = models.artifact.save_artifact

    def spy_save(result, spec, dest, **kwargs):
        seen["owner"] = kwargs.get("owner")
        return real_save(result, spec, dest, **kwargs)

    real_train = models.training.train

    def spy_train(data, spec, **kwargs):
        seen["spill"] = kwargs["cache"].dir
        return real_train(data, spec, **kwargs)

    monkeypatch.setattr(models.artifact, "save_artifact", spy_save)
    monkeypatch.setattr(models.training, "train", spy_train)
    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    job_id = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB, "epochs": 1}).json()["id"]
    assert run_job(job_id, worker="celery@host-a", settings=settings) == "succeeded"
    assert seen == {"owner": "celery_host-a", "spill": feature_spill_dir(settings, "celery@host-a")}
