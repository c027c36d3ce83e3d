"""Queues by device: a job's ``device`` picks its train queue, a worker consumes the queues of its
hardware, the reconciler counts each train queue's messages on their own, and a cuda job never
trains on a worker without a GPU."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import update

from models.spec import JOB_DEVICES
from service.db import JobRow, JobStatus, session_scope, utcnow
from service.queue import (
    EXPORT_QUEUE,
    QUEUES,
    TRAIN_CPU_QUEUE,
    TRAIN_CUDA_QUEUE,
    TRAIN_QUEUE,
    TRAIN_QUEUES,
    broker_backlog,
    get_celery,
    worker_queues,
)
from tests.conftest import api_client
from tests.utils.data import TINY_JOB
from tests.utils.workers import submit
from workers.devices import DeviceUnavailable, training_device
from workers.jobs import run_job
from workers.reconcile import reconcile

DEVICE_QUEUE = {"any": TRAIN_QUEUE, "cpu": TRAIN_CPU_QUEUE, "cuda": TRAIN_CUDA_QUEUE}


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(True)``: this host has a CUDA GPU (``gpu(False)``: none)."""

    def _set(present: bool) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if present else 0)

    return _set


@pytest.fixture
def cuda_left_alone(monkeypatch):
    """A worker chooses its queues in the process that forks its pool: ``is_available`` would
    initialize CUDA there, and the pool's children could not use the GPU."""

    def initializes_cuda() -> bool:
        raise AssertionError("torch.cuda.is_available() initializes CUDA: use models.runtime.has_cuda")

    monkeypatch.setattr(torch.cuda, "is_available", initializes_cuda)


def _backlogs() -> dict[str, int | None]:
    return {q: broker_backlog(q) for q in QUEUES}


def _sent_long_ago(settings, job_id: str, hours: float) -> None:
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=hours)))


# --------------------------------------------------------------------------- routing


def test_every_device_has_a_train_queue():
    assert tuple(TRAIN_QUEUES) == JOB_DEVICES and TRAIN_QUEUES == DEVICE_QUEUE
    assert set(QUEUES) == {*DEVICE_QUEUE.values(), EXPORT_QUEUE}


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_each_device_is_sent_to_its_queue(make_settings, request, broker):
    """The real enqueue through a real broker: the job's message lands in its device's queue only."""
    env = {"broker_url": request.getfixturevalue("redis_url")} if broker == "redis" else {}
    settings = make_settings(tenant_max_running_jobs="3", **env)
    with api_client(settings) as client:
        expected = dict.fromkeys(QUEUES, 0)
        jobs = {}
        for device in ("cuda", "any", "cpu"):
            jobs[device] = submit(client, {**TINY_JOB, "device": device})
            assert client.get(f"/v1/jobs/{jobs[device]}").json()["spec"]["device"] == device
            expected[DEVICE_QUEUE[device]] += 1
            assert _backlogs() == expected, device
    with get_celery().connection_for_read() as conn:
        for device, job_id in jobs.items():
            message = conn.default_channel.basic_get(DEVICE_QUEUE[device], no_ack=True)
            assert message.decode()[0] == [job_id], device


def test_a_job_without_a_device_is_sent_to_train(make_settings):
    """A job recorded before jobs had a device (its spec has none) goes to ``train``, as it did then."""
    from service.queue import enqueue

    settings = make_settings()
    with api_client(settings, enqueue=lambda _job_id: None) as client:
        job_id = submit(client, {**TINY_JOB, "device": "cpu"})
    with session_scope(settings) as s:
        job = s.get(JobRow, job_id)
        assert job is not None
        job.spec = {k: v for k, v in job.spec.items() if k != "device"}
    enqueue(job_id)
    assert _backlogs() == {**dict.fromkeys(QUEUES, 0), TRAIN_QUEUE: 1}


def test_a_waiting_job_is_admitted_to_its_devices_queue(make_settings, redis_url):
    """Admission (a slot freed by a cancel) sends the waiting job where its device says."""
    settings = make_settings(broker_url=redis_url, tenant_max_running_jobs="1")
    with api_client(settings) as client:
        first = submit(client, {**TINY_JOB, "device": "cuda"})
        waiting = submit(client, {**TINY_JOB, "device": "cpu"})
        assert _backlogs() == {**dict.fromkeys(QUEUES, 0), TRAIN_CUDA_QUEUE: 1}  # one slot: the cpu job waits
        assert client.post(f"/v1/jobs/{first}/cancel").status_code == 200
        assert client.get(f"/v1/jobs/{waiting}").json()["progress"]["stage"] == "queued"
    assert _backlogs() == {**dict.fromkeys(QUEUES, 0), TRAIN_CUDA_QUEUE: 1, TRAIN_CPU_QUEUE: 1}


def test_a_bad_device_is_a_422_naming_the_field(client):
    from tests.utils.data import animals_zip

    ds = client.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 2), "application/zip")}).json()
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "device": "tpu"})
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert error["field"] == "device" and all(f"'{d}'" in error["message"] for d in JOB_DEVICES), error


def test_asking_for_a_device_keeps_the_default_budget(client, enqueued):
    """``device`` says where a job trains, not how: a job that sets only it still gets the default budget."""
    job_id = submit(client, {"device": "cuda"})
    assert client.get(f"/v1/jobs/{job_id}").json()["spec"]["keep"] == []


# --------------------------------------------------------------------------- a worker's queues


@pytest.mark.parametrize(("device", "has_gpu", "expected"), [
    ("auto", True, (TRAIN_QUEUE, TRAIN_CUDA_QUEUE, EXPORT_QUEUE)),
    ("auto", False, (TRAIN_QUEUE, TRAIN_CPU_QUEUE, EXPORT_QUEUE)),
    ("cuda", False, (TRAIN_QUEUE, TRAIN_CUDA_QUEUE, EXPORT_QUEUE)),  # the operator says so
    ("cpu", True, (TRAIN_QUEUE, TRAIN_CPU_QUEUE, EXPORT_QUEUE)),  # a GPU host kept to the CPU
])
def test_a_worker_consumes_the_queue_of_its_hardware(make_settings, gpu, cuda_left_alone, device, has_gpu, expected):
    gpu(has_gpu)
    assert worker_queues(make_settings(device=device)) == expected


def test_the_operator_names_a_workers_queues(make_settings, gpu, cuda_left_alone, caplog):
    gpu(False)
    named = make_settings(worker_queues=" train-cuda, export,train-cuda ")
    assert worker_queues(named) == (TRAIN_CUDA_QUEUE, EXPORT_QUEUE)
    assert "names train-cuda on a worker without a GPU" in caplog.text  # said at start, before any job fails
    with pytest.raises(ValueError, match="unknown queue 'gpu'; valid: export, train, train-cpu, train-cuda"):
        worker_queues(make_settings(worker_queues="train,gpu"))


def test_zoofit_worker_passes_the_computed_queues(make_settings, gpu, cuda_left_alone, monkeypatch):
    from service import cli

    argv: list[list[str]] = []
    monkeypatch.setattr(cli, "get_celery", lambda: SimpleNamespace(worker_main=argv.append))
    gpu(True)
    make_settings()
    cli.run_worker()
    make_settings(device="cpu")
    cli.run_worker()
    assert [a for args in argv for a in args if a.startswith("--queues=")] == [
        "--queues=train,train-cuda,export", "--queues=train,train-cpu,export"]
    make_settings(worker_queues="train,gpu")
    with pytest.raises(SystemExit, match="ZOOFIT_WORKER_QUEUES: unknown queue 'gpu'"):
        cli.run_worker()
    assert len(argv) == 2


def test_a_celery_worker_started_without_queues_consumes_the_computed_ones(make_settings, gpu, cuda_left_alone):
    """``celery -A workers.celery_app worker`` without -Q: the same queues as ``zoofit worker``."""
    from service.queue import make_celery
    from workers.celery_app import _choose_queues

    gpu(False)
    settings = make_settings()
    app = make_celery(settings)
    assert set(app.amqp.queues.consume_from) == set(QUEUES)  # what Celery would consume by itself
    _choose_queues(instance=SimpleNamespace(app=app), options={"queues": None})
    assert set(app.amqp.queues.consume_from) == {TRAIN_QUEUE, TRAIN_CPU_QUEUE, EXPORT_QUEUE}
    given = make_celery(settings)
    _choose_queues(instance=SimpleNamespace(app=given), options={"queues": [TRAIN_CUDA_QUEUE]})
    assert set(given.amqp.queues.consume_from) == set(QUEUES)  # -Q given: Celery selects those itself


# --------------------------------------------------------------------------- lost messages, per queue


def test_lost_messages_are_counted_per_queue(client, settings, enqueued):
    """A cuda job waits for a GPU host with its message held in train-cuda; an any job's message was
    lost from train. Only the any job is sent again, though the cuda one waited longer."""
    cuda = submit(client, {**TINY_JOB, "device": "cuda"})
    anyjob = submit(client, TINY_JOB)
    _sent_long_ago(settings, cuda, 2)
    _sent_long_ago(settings, anyjob, 1)
    held = {TRAIN_QUEUE: 0, TRAIN_CPU_QUEUE: 0, TRAIN_CUDA_QUEUE: 1}
    asked: list[str] = []

    def backlog(queue: str) -> int:
        asked.append(queue)
        return held[queue]

    sent: list[str] = []
    assert reconcile(settings, sent.append, backlog) == [anyjob] and sent == [anyjob]
    assert sorted(asked) == [TRAIN_QUEUE, TRAIN_CUDA_QUEUE]  # the queues of the jobs that waited, each once


def test_the_reconciler_resends_a_lost_cuda_job_to_train_cuda_once(make_settings, redis_url):
    """Real enqueue and backlog on Redis: the broker lost the message (flushed), the job goes back to
    its own queue, and while that queue holds it, it is not sent again."""
    import redis

    from service.queue import enqueue

    settings = make_settings(broker_url=redis_url)
    with api_client(settings) as client:
        job_id = submit(client, {**TINY_JOB, "device": "cuda"})
    redis.Redis.from_url(redis_url).flushdb()
    _sent_long_ago(settings, job_id, 1)
    assert reconcile(settings, enqueue, broker_backlog) == [job_id]
    assert _backlogs() == {**dict.fromkeys(QUEUES, 0), TRAIN_CUDA_QUEUE: 1}
    _sent_long_ago(settings, job_id, 1)
    assert reconcile(settings, enqueue, broker_backlog) == []
    assert _backlogs() == {**dict.fromkeys(QUEUES, 0), TRAIN_CUDA_QUEUE: 1}


# --------------------------------------------------------------------------- the training device


@pytest.mark.parametrize(("job", "setting", "has_gpu", "expected"), [
    ("any", "auto", True, "auto"),
    ("any", "cpu", True, "cpu"),
    ("any", "cuda", True, "cuda"),
    ("cpu", "auto", True, "cpu"),  # a cpu job on a GPU worker trains on its CPU
    ("cpu", "cuda", True, "cpu"),
    ("cuda", "auto", True, "cuda"),
    ("cuda", "cuda", True, "cuda"),
])
def test_the_job_and_the_worker_decide_the_training_device(make_settings, gpu, job, setting, has_gpu, expected):
    gpu(has_gpu)
    assert training_device(job, make_settings(device=setting)) == expected


@pytest.mark.parametrize(("setting", "has_gpu", "why"), [
    ("auto", False, "ZOOFIT_DEVICE=auto, no CUDA device found"),
    ("cuda", False, "ZOOFIT_DEVICE=cuda, no CUDA device found"),
    ("cpu", True, "ZOOFIT_DEVICE=cpu"),
])
def test_a_cuda_job_never_trains_without_a_gpu(make_settings, gpu, setting, has_gpu, why):
    gpu(has_gpu)
    with pytest.raises(DeviceUnavailable, match=f"worker w1 has no GPU \\({why}\\)"):
        training_device("cuda", make_settings(device=setting), "w1")


def test_a_worker_without_a_gpu_fails_a_cuda_job_saying_why(client, settings, gpu, monkeypatch):
    import models.training

    trained: list = []
    monkeypatch.setattr(models.training, "train", lambda *a, **kw: trained.append(kw))
    gpu(False)
    job_id = submit(client, {**TINY_JOB, "device": "cuda"})
    assert run_job(job_id, worker="cpu-host@w", settings=settings) == JobStatus.FAILED
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["error"].startswith("DeviceUnavailable: this job asks for cuda; worker cpu-host@w has no GPU"), j["error"]
    assert "'train-cuda'" in j["error"] and j["model_id"] is None
    assert trained == []  # it never started training, on the CPU or anywhere


def test_a_cpu_job_on_a_gpu_worker_trains_on_the_cpu(client, settings, gpu, monkeypatch):
    import models.training

    real = models.training.train
    devices: list[str] = []

    def spy(*args, **kwargs):
        devices.append(kwargs["device"])
        return real(*args, **kwargs)

    monkeypatch.setattr(models.training, "train", spy)
    gpu(True)
    job_id = submit(client, {**TINY_JOB, "epochs": 1, "device": "cpu"})
    assert run_job(job_id, settings=settings) == JobStatus.SUCCEEDED
    assert devices == ["cpu"]


def test_a_budgeted_cpu_job_on_a_gpu_worker_plans_for_the_cpu(client, settings, gpu, monkeypatch):
    """The default budget and the planner's device follow the job's device too (a plain job: budgeted)."""
    import models.planner

    planned: list = []

    def fit_budgeted(decode, spec, budget_s, **kwargs):
        planned.append((budget_s, kwargs["device"]))
        raise ValueError("stop here")

    monkeypatch.setattr(models.planner, "fit_budgeted", fit_budgeted)
    gpu(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    job_id = submit(client, {"device": "cpu"})
    assert run_job(job_id, settings=settings) == JobStatus.FAILED
    assert planned == [(settings.default_budget_cpu_s, "cpu")]


def test_a_budgeted_jobs_progress_says_when_its_budget_ends(client, settings, monkeypatch):
    """The console caps a budgeted job's ETA at the budget's end: its plan names up to 5 members and the
    run trains those that fit, so members x epochs alone would promise several budgets."""
    from datetime import UTC, datetime, timedelta

    import models.planner
    from models.planner import Plan

    def fit_budgeted(decode, spec, budget_s, **kwargs):
        kwargs["on_plan"](spec, Plan(budget_s=budget_s, default_budget=True, device="cpu", kept=[], planned={},
                                     why=[], throughputs=[], measure_seconds=0.0, estimate_seconds=0.0))
        raise ValueError("stop here")

    monkeypatch.setattr(models.planner, "fit_budgeted", fit_budgeted)
    before = datetime.now(UTC)
    job_id = submit(client, {"budget_s": 60})
    assert run_job(job_id, settings=settings) == JobStatus.FAILED
    progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
    ends = datetime.fromisoformat(progress["plan"]["ends_at"])
    assert before < ends <= datetime.now(UTC) + timedelta(seconds=60)
