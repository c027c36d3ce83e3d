"""Per-tenant quotas, job size caps and fair admission to the broker (issue 10, item 3).

Count limits answer 429, size limits 422; each message names the limit's setting and its value.
A tenant has at most ``tenant_max_running_jobs`` jobs in the broker or running; its other queued
jobs wait in the database and are sent when one of its jobs ends, so one tenant's backlog never
sits in front of another tenant's job.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from service.db import JobRow, JobStatus, session_scope, utcnow
from service.quotas import QUEUE_RETRY_AFTER_S
from tests.conftest import api_client, issue_key
from tests.utils.data import TINY_JOB, animals_zip
from workers.reconcile import reconcile

WAITING = "waiting for a free slot"


def _dataset(c, per_class: int = 3, classes: int = 2) -> str:
    r = c.post("/v1/datasets", files={"file": ("a.zip", animals_zip(per_class, classes), "application/zip")})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _submit(c, dataset_id: str, **spec: object) -> str:
    r = c.post("/v1/jobs", json={"dataset_id": dataset_id, **TINY_JOB, **spec})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _finish(settings, job_id: str, status: str = JobStatus.SUCCEEDED) -> None:
    """What a worker's terminal write does to the record."""
    with session_scope(settings) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(status=status, finished_at=utcnow()))


def _stage(c, job_id: str) -> str:
    return str(c.get(f"/v1/jobs/{job_id}").json()["progress"]["stage"])


# --------------------------------------------------------------------------- count limits: 429


def test_queued_jobs_over_the_tenant_limit_are_429_naming_the_limit(make_settings, enqueued):
    s = make_settings(tenant_max_queued_jobs="3", tenant_max_running_jobs="1")
    with api_client(s, "alice", enqueued.append) as alice, api_client(s, "bob", enqueued.append) as bob:
        ds = _dataset(alice)
        jobs = [_submit(alice, ds) for _ in range(3)]
        r = alice.post("/v1/jobs", json={"dataset_id": ds, **TINY_JOB})
        assert r.status_code == 429, r.text
        detail = r.json()["detail"]
        assert "3 queued jobs" in detail and "ZOOFIT_TENANT_MAX_QUEUED_JOBS=3" in detail, detail
        assert r.json()["limit"] == "ZOOFIT_TENANT_MAX_QUEUED_JOBS" and r.json()["value"] == 3
        assert r.headers["Retry-After"] == str(QUEUE_RETRY_AFTER_S)  # when a client might try again
        assert alice.get("/v1/jobs").json()["count"] == 3  # nothing recorded for the refused one
        # the limit is per tenant: bob is not affected
        _submit(bob, _dataset(bob))
        # a cancelled job leaves room for one more
        assert alice.post(f"/v1/jobs/{jobs[-1]}/cancel").status_code == 200
        _submit(alice, ds)


def test_running_limit_sends_k_jobs_per_tenant_the_rest_wait(make_settings, enqueued):
    s = make_settings(tenant_max_running_jobs="2")
    with api_client(s, "alice", enqueued.append) as alice:
        ds = _dataset(alice)
        jobs = [_submit(alice, ds) for _ in range(4)]
        assert enqueued == jobs[:2]
        for job_id in jobs[2:]:
            got = alice.get(f"/v1/jobs/{job_id}").json()
            assert got["status"] == "queued" and got["progress"]["stage"] == WAITING
            assert "ZOOFIT_TENANT_MAX_RUNNING_JOBS=2" in got["progress"]["detail"]
        assert _stage(alice, jobs[0]) == "queued"


def test_one_tenants_backlog_does_not_starve_another(make_settings, enqueued):
    """Tenant A submits 6 jobs, then B one: B's job reaches the broker before A's 3rd, and runs 3rd."""
    s = make_settings(tenant_max_running_jobs="2")
    with api_client(s, "tenant-a", enqueued.append) as a, api_client(s, "tenant-b", enqueued.append) as b:
        ds_a = _dataset(a)
        a_jobs = [_submit(a, ds_a) for _ in range(6)]
        b_job = _submit(b, _dataset(b))
        assert enqueued == [*a_jobs[:2], b_job]

        # One worker takes messages first come, first served; each job's end admits the next.
        from service.admission import admit

        ran = []
        while enqueued:
            job_id = enqueued.pop(0)
            ran.append(job_id)
            _finish(s, job_id)
            admit(s, enqueued.append)
        assert ran == [*a_jobs[:2], b_job, *a_jobs[2:]]


def test_the_workers_end_of_job_sends_the_tenants_next_job(make_settings, enqueued, monkeypatch):
    s = make_settings(tenant_max_running_jobs="1")
    with api_client(s, "alice", enqueued.append) as alice:
        ds = _dataset(alice)
        first, second = _submit(alice, ds), _submit(alice, ds)
        assert enqueued == [first]

        import workers.tasks as tasks

        sent: list[str] = []

        def fake_run_job(job_id: str, **_kw: object) -> str:
            _finish(s, job_id)
            return JobStatus.SUCCEEDED

        monkeypatch.setattr(tasks, "run_job", fake_run_job)
        monkeypatch.setattr(tasks, "enqueue", sent.append)
        assert tasks.train_job.apply(args=[first]).get() == JobStatus.SUCCEEDED
        assert sent == [second]
        assert _stage(alice, second) == "queued"


def test_reconciler_does_not_resend_waiting_jobs_and_admits_them_when_a_slot_frees(make_settings, enqueued):
    s = make_settings(tenant_max_running_jobs="1")
    with api_client(s, "alice", enqueued.append) as alice:
        ds = _dataset(alice)
        first, second = _submit(alice, ds), _submit(alice, ds)
        assert enqueued == [first]
        sent: list[str] = []
        assert reconcile(s, sent.append) == [] and sent == []  # waiting for a slot is not 'lost'
        with session_scope(s) as session:
            row = session.get(JobRow, second)
            assert row is not None and row.enqueued_at is None
        # the first job ends without anyone admitting the next (a worker killed after its write)
        _finish(s, first, JobStatus.FAILED)
        assert reconcile(s, sent.append) == [second] and sent == [second]
        assert reconcile(s, sent.append) == [] and sent == [second]  # once
        # an admitted job whose message is lost is still sent again after requeue_after_s
        with session_scope(s) as session:
            session.execute(update(JobRow).where(JobRow.id == second)
                            .values(enqueued_at=utcnow() - timedelta(hours=1)))
        assert reconcile(s, sent.append) == [second]


def test_cancelling_a_sent_job_sends_the_next_waiting_one(make_settings, enqueued):
    s = make_settings(tenant_max_running_jobs="1")
    with api_client(s, "alice", enqueued.append) as alice:
        ds = _dataset(alice)
        first, second, third = (_submit(alice, ds) for _ in range(3))
        assert enqueued == [first]
        # cancelling a waiting job frees no slot
        assert alice.post(f"/v1/jobs/{third}/cancel").json()["status"] == "cancelled"
        assert enqueued == [first]
        assert alice.post(f"/v1/jobs/{first}/cancel").json()["status"] == "cancelled"
        assert enqueued == [first, second]


# --------------------------------------------------------------------------- size limits: 422


def test_job_cost_over_the_cap_is_422_with_its_figures(make_settings, enqueued):
    # 6 images at 64 px, 2 epochs: 6 * 64**2 * 2 = 49,152 pixel-epochs.
    s = make_settings(job_max_pixel_epochs="40000")
    with api_client(s, "alice", enqueued.append) as alice:
        ds = _dataset(alice)
        r = alice.post("/v1/jobs", json={"dataset_id": ds, **TINY_JOB, "image_size": 64})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "49152 pixel-epochs" in detail and "6 images" in detail and "64x64" in detail, detail
        assert "2 epochs" in detail and "ZOOFIT_JOB_MAX_PIXEL_EPOCHS=40000" in detail, detail
        assert r.json()["limit"] == "ZOOFIT_JOB_MAX_PIXEL_EPOCHS" and r.json()["actual"] == 49152
        # members and sweep trials count: 3 members at 32 px is 6 * 32**2 * 2 * 3 = 36,864: fits
        _submit(alice, ds, ensemble={"members": 3})
        r = alice.post("/v1/jobs", json={"dataset_id": ds, **TINY_JOB, "ensemble": {"members": 4}})
        assert r.status_code == 422 and "49152 pixel-epochs" in r.json()["detail"]
        assert "4 members" in r.json()["detail"]
        r = alice.post("/v1/jobs", json={"dataset_id": ds, **TINY_JOB, "sweep": {"trials": 4}})
        assert r.status_code == 422 and "sweep" in r.json()["detail"]
        assert len(enqueued) == 1


def test_decoded_dataset_over_its_memory_budget_is_422_with_the_figure(make_settings, enqueued):
    # 6 images decoded at 1024 px are 6 * 1024 * 1024 * 3 = 18,874,368 bytes.
    s = make_settings(decoded_max_bytes="10000000")
    with api_client(s, "alice", enqueued.append) as alice:
        ds = _dataset(alice)
        r = alice.post("/v1/jobs", json={"dataset_id": ds, **TINY_JOB, "image_size": 1024})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "6 images x 1024x1024 px x 3 bytes = 18874368 bytes" in detail, detail
        assert "ZOOFIT_DECODED_MAX_BYTES=10000000" in detail, detail
        # the backbone's native size counts when image_size is not given (test_efficientnet: 160)
        native = {**TINY_JOB, "image_size": None}
        assert alice.post("/v1/jobs", json={"dataset_id": ds, **native}).status_code == 202
        assert alice.post("/v1/jobs", json={"dataset_id": ds, **TINY_JOB, "image_size": 512}).status_code == 202
        assert len(enqueued) == 2


def test_the_issues_flood_is_bounded_by_default(client, enqueued):
    """50 submissions in a burst: 20 are recorded, 2 reach the broker, the rest answer 429."""
    ds = _dataset(client)
    codes = [client.post("/v1/jobs", json={"dataset_id": ds, **TINY_JOB}).status_code for _ in range(50)]
    assert codes == [202] * 20 + [429] * 30
    assert len(enqueued) == 2


def test_the_issues_maximum_settings_job_on_50000_images_is_refused_by_default():
    """The issue's job: 1024 px, 16 members x 1000 epochs, 64 trials x 4 rounds, on 50,000 images."""
    import pytest

    from models.spec import TrainSpec
    from service.config import Settings
    from service.db import DatasetRow
    from service.errors import ServiceError
    from service.quotas import check_job_fits

    spec = TrainSpec.model_validate({
        **TINY_JOB, "image_size": 1024, "batch_size": 4096, "epochs": 1000,
        "ensemble": {"members": 16}, "sweep": {"trials": 64, "rounds": 4},
    })
    dataset = DatasetRow(id="d1", classes=["a", "b"], num_images=50_000)
    with pytest.raises(ServiceError) as err:
        check_job_fits(Settings(), dataset, spec)
    assert err.value.status == 422
    assert "50000 images x 1024x1024 px x 3 bytes = 157286400000 bytes" in err.value.message
    assert "ZOOFIT_DECODED_MAX_BYTES=8589934592" in err.value.message
    # within the memory budget (64 px), the pixel-epochs cap still refuses it
    with pytest.raises(ServiceError) as err:
        check_job_fits(Settings(), dataset, spec.model_copy(update={"image_size": 64}))
    assert err.value.status == 422 and "ZOOFIT_JOB_MAX_PIXEL_EPOCHS=1000000000000" in err.value.message


def test_classes_over_the_cap_are_422_at_upload_and_at_submission(make_settings, enqueued):
    s = make_settings(max_classes="2")
    with api_client(s, "alice", enqueued.append) as alice:
        r = alice.post("/v1/datasets", files={"file": ("a.zip", animals_zip(3, 3), "application/zip")})
        assert r.status_code == 422, r.text
        assert "3 classes" in r.json()["detail"] and "ZOOFIT_MAX_CLASSES=2" in r.json()["detail"]
        assert alice.get("/v1/datasets").json()["count"] == 0
        assert list(s.datasets_dir.iterdir()) == []  # nothing left on disk
        ds = _dataset(alice, classes=2)
    # a dataset stored under a higher cap is refused at submission once the cap is lower
    s3 = make_settings(max_classes="3")
    with api_client(s3, "alice", enqueued.append) as alice:
        big = _dataset(alice, classes=3)
    s2 = make_settings(max_classes="2")
    with api_client(s2, "alice", enqueued.append) as alice:
        r = alice.post("/v1/jobs", json={"dataset_id": big, **TINY_JOB})
        assert r.status_code == 422 and "3 classes" in r.json()["detail"], r.text
        assert "ZOOFIT_MAX_CLASSES=2" in r.json()["detail"]
        _submit(alice, ds)


# --------------------------------------------------------------------------- admin powers


def test_an_admin_may_cancel_any_tenants_job(make_settings, enqueued):
    s = make_settings(tenant_max_running_jobs="1")
    with api_client(s, "alice", enqueued.append) as alice, api_client(s, "bob", enqueued.append) as bob:
        ds = _dataset(alice)
        job, waiting = _submit(alice, ds), _submit(alice, ds)
        assert bob.post(f"/v1/jobs/{job}/cancel").status_code == 404  # other tenants still see nothing
        admin_key = issue_key(s, "ops", admin=True)
        r = bob.post(f"/v1/jobs/{job}/cancel", headers={"Authorization": f"Bearer {admin_key}"})
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        assert alice.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"
        assert enqueued == [job, waiting]  # the slot went to alice's next job
        r = bob.post("/v1/jobs/nope/cancel", headers={"Authorization": f"Bearer {admin_key}"})
        assert r.status_code == 404


def test_revoking_a_tenants_last_key_can_cancel_its_jobs(make_settings, enqueued):
    s = make_settings(tenant_max_running_jobs="1")
    admin = {"Authorization": f"Bearer {issue_key(s, 'ops', admin=True)}"}
    with api_client(s, "carol", enqueued.append) as carol, api_client(s, "bob", enqueued.append) as bob:
        ds = _dataset(carol)
        sent, waiting = _submit(carol, ds), _submit(carol, ds)
        bobs = _submit(bob, _dataset(bob))
        keys = {k["tenant"]: k["id"] for k in carol.get("/v1/keys", headers=admin).json()["data"]}

        # a second live key of carol's: refused with cancel_jobs, nothing revoked
        second = carol.post("/v1/keys", json={"tenant": "carol"}, headers=admin).json()
        r = carol.delete(f"/v1/keys/{keys['carol']}", params={"cancel_jobs": "true"}, headers=admin)
        assert r.status_code == 409 and "1 other live key" in r.json()["detail"], r.text
        assert carol.get("/v1/jobs").status_code == 200

        # revoking the other one without cancel_jobs leaves the jobs alone
        r = carol.delete(f"/v1/keys/{second['id']}", headers=admin)
        assert r.status_code == 200 and r.json()["revoked"] and r.json()["cancelled_jobs"] == []

        r = carol.delete(f"/v1/keys/{keys['carol']}", params={"cancel_jobs": "true"}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["revoked"] is True and sorted(r.json()["cancelled_jobs"]) == sorted([sent, waiting])
        assert carol.get("/v1/jobs").status_code == 401
        with session_scope(s) as session:
            status = {job_id: st for job_id, st in session.execute(select(JobRow.id, JobRow.status))}
        assert status == {sent: "cancelled", waiting: "cancelled", bobs: "queued"}
        assert enqueued == [sent, bobs]  # carol's waiting job was never sent
