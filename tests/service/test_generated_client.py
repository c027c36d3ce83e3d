"""A client generated from /openapi.json by openapi-python-client works against the API.

The generator runs with ``--fail-on-warning``: a schema it cannot fully turn into code (an
unsupported content type, a file field it reads as text, a broken reference) fails this test.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from service.config import Settings
from tests.conftest import api_client, issue_key
from tests.utils.data import TINY_JOB, animals_zip

PACKAGE = "zoofit_generated_client"
# PNG figures come back as bytes; no formatter runs on the generated code (ruff need not be on PATH).
CONFIG = (
    "post_hooks: []\ncontent_type_overrides:\n"
    "  image/png: application/octet-stream\n  image/jpeg: application/octet-stream\n"
    "  application/zip: application/octet-stream\n"
)


def _generator() -> str:
    found = shutil.which("openapi-python-client") or str(Path(sys.executable).with_name("openapi-python-client"))
    if not Path(found).exists():
        pytest.fail("openapi-python-client is not installed (pip install -e '.[dev]')")
    return found


@pytest.fixture
def generated(tmp_path: Path, settings: Settings) -> Iterator[ModuleType]:
    """The client package generated from the app's schema, imported."""
    from service.app import create_app

    (tmp_path / "openapi.json").write_text(json.dumps(create_app(settings).openapi()))
    (tmp_path / "config.yaml").write_text(CONFIG)
    done = subprocess.run(
        [_generator(), "generate", "--path", "openapi.json", "--output-path", PACKAGE, "--meta", "none",
         "--config", "config.yaml", "--fail-on-warning"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "warning" not in output.lower(), output
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _client(package: ModuleType, settings: Settings, key: str | None, enqueued: list[str]) -> Any:
    """The generated client, its requests served in-process by the app (jobs go to ``enqueued``)."""
    from importlib import import_module

    client_mod = import_module(f"{PACKAGE}.client")
    base = "http://testserver"
    client = client_mod.AuthenticatedClient(base_url=base, token=key) if key else client_mod.Client(base_url=base)
    # A TestClient is an httpx.Client that calls the app in-process.
    http = api_client(settings, tenant=None, enqueue=enqueued.append)
    if key:
        http.headers[client.auth_header_name] = f"{client.prefix} {client.token}"
    return client.set_httpx_client(http)


def test_a_generated_client_lists_uploads_submits_and_reads_problems(generated, settings, enqueued):
    from importlib import import_module

    def api(name: str) -> Any:
        return import_module(f"{PACKAGE}.api.{name}")

    models = import_module(f"{PACKAGE}.models")  # re-exports every generated model class
    types = import_module(f"{PACKAGE}.types")
    key = issue_key(settings, "alice")
    with _client(generated, settings, key, enqueued) as client:
        presets = api("presets.presets_list").sync(client=client)
        assert {p.name.value for p in presets.data} == {"fast", "balanced", "best"}  # an enum, not a str

        upload = models.BodyDatasetsUpload(
            file=types.File(payload=io.BytesIO(animals_zip(3, 2)), file_name="animals.zip", mime_type="application/zip")
        )
        dataset = api("datasets.datasets_upload").sync(client=client, body=upload)
        assert isinstance(dataset, models.DatasetPublic), dataset
        assert dataset.num_images == 6

        job = api("jobs.jobs_create").sync(client=client, body=models.JobCreate.from_dict(
            {"dataset_id": dataset.id, **TINY_JOB}))
        assert isinstance(job, models.JobPublic), job
        assert job.spec["optimizer"]["name"] == "adam"
        got = api("jobs.jobs_get").sync(client=client, job_id=job.id)
        assert got.id == job.id and got.status.value == "queued" and enqueued == [job.id]

        missing = api("jobs.jobs_get").sync(client=client, job_id="nope")
        assert isinstance(missing, models.Problem) and missing.status == 404 and "nope" in missing.detail

        bad = models.JobCreate.from_dict({"dataset_id": dataset.id, **TINY_JOB, "optimizer": {"lr": -1.0}})
        invalid = api("jobs.jobs_create").sync(client=client, body=bad)
        assert isinstance(invalid, models.Problem) and invalid.status == 422, invalid
        assert [e.field for e in invalid.errors] == ["optimizer.lr"]

    with _client(generated, settings, None, enqueued) as anonymous:
        refused = api("datasets.datasets_list").sync(client=anonymous)
        assert isinstance(refused, models.Problem) and refused.status == 401
