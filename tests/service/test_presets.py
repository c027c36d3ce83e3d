"""Named presets: every one is a valid job, and the API lists them."""

from __future__ import annotations

import pytest

from service.presets import PRESETS
from service.schemas import JobCreate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_job(name):
    spec = JobCreate.model_validate({"dataset_id": "x", **PRESETS[name].job})
    for key, value in PRESETS[name].job.items():
        if not isinstance(value, dict):
            assert getattr(spec, key) == value, key  # nothing silently dropped or coerced


def test_presets_are_budgets_that_grow():
    fast, balanced, best = (JobCreate.model_validate({"dataset_id": "x", **PRESETS[n].job})
                            for n in ("fast", "balanced", "best"))
    assert fast.budget_s is not None and balanced.budget_s is not None and best.budget_s is not None
    assert fast.budget_s < balanced.budget_s < best.budget_s
    assert best.ensemble.ema and best.ensemble.greedy
    for p in PRESETS.values():
        assert str(int(p.job["budget_s"])) in p.description  # each says what it does


def test_presets_route_lists_them_and_one_submits(client, enqueued):
    from tests.service.test_api import upload
    from tests.utils.data import animals_zip

    body = client.get("/v1/presets").json()
    assert [p["name"] for p in body["data"]] == ["fast", "balanced", "best"]
    ds = upload(client, animals_zip(per_class=4)).json()
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], **body["data"][0]["job"]})
    assert r.status_code == 202, r.text
    spec = r.json()["spec"]
    assert spec["budget_s"] == 60
    assert spec["keep"] == []  # the planner plans every field
