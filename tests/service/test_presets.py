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


def test_presets_grow_in_cost():
    fast, balanced, best = (JobCreate.model_validate({"dataset_id": "x", **PRESETS[n].job})
                            for n in ("fast", "balanced", "best"))
    assert fast.image_size < balanced.image_size < best.image_size
    assert fast.ensemble.members < balanced.ensemble.members < best.ensemble.members


def test_presets_route_lists_them_and_one_submits(client, enqueued):
    from tests.service.test_api import upload
    from tests.utils.data import animals_zip

    body = client.get("/v1/presets").json()
    assert [p["name"] for p in body["data"]] == ["fast", "balanced", "best"]
    ds = upload(client, animals_zip(per_class=4)).json()
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], **body["data"][0]["job"]})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["image_size"] == 64
