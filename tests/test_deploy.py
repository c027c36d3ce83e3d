"""Deployment files: the compose stack is valid and wires the same settings the code reads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
# Set by .ci/run, which installs docker-compose first: there a missing docker-compose is a failure, not a skip.
REQUIRE_COMPOSE = "ZOOFIT_TEST_REQUIRE_COMPOSE"


def _compose_required() -> bool:
    return os.environ.get(REQUIRE_COMPOSE, "").strip().lower() not in ("", "0", "false", "no")


SECRETS = {
    "POSTGRES_PASSWORD": "pg-s3cret-for-the-test",
    "REDIS_PASSWORD": "redis-s3cret-for-the-test",
    "MINIO_ROOT_PASSWORD": "minio-s3cret-for-the-test",
}


def _config(*files: str, env: dict[str, str] | None = None) -> str:
    if shutil.which("docker-compose") is None:
        hint = "docker-compose not installed (apt-get install -y docker-compose)"
        if _compose_required():
            pytest.fail(f"{hint}, and {REQUIRE_COMPOSE} says the compose files must be checked")
        pytest.skip(hint)
    args = ["docker-compose"]
    for f in files:
        args += ["-f", str(ROOT / f)]
    out = _run([*args, "config"], SECRETS if env is None else env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Only the variables given: the secrets must come from the env file the README asks for.
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**base, **env})


def test_compose_gpu_stack_is_valid():
    cfg = _config("docker-compose.yml")
    for service in ("api:", "worker:", "redis:", "postgres:"):
        assert f"  {service}" in cfg
    assert "driver: nvidia" in cfg and "healthcheck" in cfg
    assert f"ZOOFIT_BROKER_URL: redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0" in cfg
    assert "postgresql+psycopg://" in cfg


def test_compose_cpu_fallback_is_valid():
    cfg = _config("docker-compose.yml", "docker-compose.cpu.yml")
    assert "worker-cpu:" in cfg and "ZOOFIT_DEVICE: cpu" in cfg


def test_compose_env_names_are_real_settings():
    text = (ROOT / "docker-compose.yml").read_text()
    names = {line.split(":")[0].strip() for line in text.splitlines() if line.strip().startswith("ZOOFIT_")}
    fields = {f"ZOOFIT_{name.upper()}" for name in Settings.model_fields}
    assert names and names <= fields, names - fields


def test_a_missing_docker_compose_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv(REQUIRE_COMPOSE, "1")
    with pytest.raises(pytest.fail.Exception, match="docker-compose not installed"):
        _config("docker-compose.yml")
    monkeypatch.delenv(REQUIRE_COMPOSE)
    with pytest.raises(pytest.skip.Exception):
        _config("docker-compose.yml")


def test_compose_takes_its_secrets_from_an_env_file_and_redis_needs_a_password():
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        text = (ROOT / name).read_text()
        assert "zoofit:zoofit@" not in text and "POSTGRES_PASSWORD: zoofit" not in text, name
    cfg = _config("docker-compose.yml", "docker-compose.cpu.yml")
    pg, redis = SECRETS["POSTGRES_PASSWORD"], SECRETS["REDIS_PASSWORD"]
    assert f"postgresql+psycopg://zoofit:{pg}@postgres:5432/zoofit" in cfg
    assert cfg.count(f"redis://:{redis}@redis:6379/0") >= 3  # api, worker, worker-cpu
    assert "--requirepass" in cfg
    if shutil.which("docker-compose"):
        missing = _run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], {})
        assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr + missing.stdout
    example = (ROOT / ".env.example").read_text()
    assert set(SECRETS) <= {line.split("=")[0] for line in example.splitlines() if "=" in line}


def _services(*files: str) -> dict:
    return yaml.safe_load(_config(*files))["services"]


def test_compose_upgrades_the_schema_once_before_the_api_and_the_workers_start():
    for files, workers in ((("docker-compose.yml",), ("worker",)),
                           (("docker-compose.yml", "docker-compose.cpu.yml"), ("worker", "worker-cpu"))):
        services = _services(*files)
        migrate = services["migrate"]
        assert migrate["command"] == ["zoofit", "db", "upgrade"] and migrate["restart"] == "no"
        assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert migrate["environment"]["ZOOFIT_DATABASE_URL"] == services["api"]["environment"]["ZOOFIT_DATABASE_URL"]
        for name in ("api", *workers):
            assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
            assert services[name]["environment"]["ZOOFIT_LOG_FORMAT"] == "json", name
        for name in workers:  # scraped over the compose network
            assert services[name]["environment"]["ZOOFIT_WORKER_METRICS_HOST"] == "0.0.0.0"
            assert "9540" in [str(p) for p in services[name]["expose"]]


def test_compose_has_minio_with_its_bucket_made_at_start_and_credentials_from_the_env_file():
    services = _services("docker-compose.yml")
    minio, bucket = services["minio"], services["minio-bucket"]
    assert minio["image"].startswith("minio/minio") and "healthcheck" in minio
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == SECRETS["MINIO_ROOT_PASSWORD"]
    assert bucket["image"].startswith("minio/mc") and bucket["restart"] == "no"
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(bucket["command"])
    assert bucket["environment"]["MINIO_ROOT_PASSWORD"] == SECRETS["MINIO_ROOT_PASSWORD"]
    assert "minio-data" in yaml.safe_load(_config("docker-compose.yml"))["volumes"]
    if shutil.which("docker-compose"):
        env = {k: v for k, v in SECRETS.items() if k != "MINIO_ROOT_PASSWORD"}
        missing = _run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env)
        assert missing.returncode != 0 and "MINIO_ROOT_PASSWORD" in missing.stderr + missing.stdout


def _named_volumes(service: dict, declared: set[str]) -> dict[str, str]:
    """{named volume: mount path} of a service (short or long syntax; bind mounts are not named volumes)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, _, rest = v.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = v.get("source", ""), v.get("target", "")
        assert source in declared or source.startswith(("/", ".", "~")) or not source, v
        if source in declared:
            out[source] = target
    return out


def test_compose_api_and_workers_share_no_disk_and_keep_artifacts_in_minio():
    for files, workers in ((("docker-compose.yml",), ("worker",)),
                           (("docker-compose.yml", "docker-compose.cpu.yml"), ("worker", "worker-cpu"))):
        cfg = yaml.safe_load(_config(*files))
        services, declared = cfg["services"], set(cfg.get("volumes") or {})
        bucket = services["minio-bucket"]["environment"]
        mounts = {}
        for name in ("api", *workers):
            svc, env = services[name], services[name]["environment"]
            assert env["ZOOFIT_STORAGE_URL"] == f"s3://{bucket['MINIO_BUCKET']}/artifacts", name
            assert env["ZOOFIT_S3_ENDPOINT_URL"] == "http://minio:9000", name
            assert env["ZOOFIT_S3_ACCESS_KEY_ID"] == bucket["MINIO_ROOT_USER"], name
            assert env["ZOOFIT_S3_SECRET_ACCESS_KEY"] == SECRETS["MINIO_ROOT_PASSWORD"], name
            assert svc["depends_on"]["minio-bucket"] == {"condition": "service_completed_successfully"}, name
            mounts[name] = _named_volumes(svc, declared)
            # scratch is on a volume of the service's own, not in the container's writable layer
            assert any(env["ZOOFIT_SCRATCH_DIR"].startswith(path) for path in mounts[name].values()), name
            assert not [v for v in svc.get("volumes", []) if isinstance(v, str) and v.startswith(("/", "."))]
            # the settings the code reads give an S3 store at MinIO (nothing is contacted)
            from service.storage import open_store
            from service.storage.s3 import S3Store

            settings = Settings(**{k.removeprefix("ZOOFIT_").lower(): v for k, v in env.items()})
            store = open_store(settings)
            assert isinstance(store, S3Store) and store.url == f"s3://{bucket['MINIO_BUCKET']}/artifacts"
            assert store.endpoint_url == "http://minio:9000"
        names = list(mounts)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not set(mounts[a]) & set(mounts[b]), (a, b, mounts)


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_installs_the_dependencies_in_a_layer_before_the_code():
    steps = _dockerfile()
    copies = [(i, args) for i, (word, args) in enumerate(steps) if word in ("COPY", "ADD")]
    deps = [i for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install -r" in args]
    project = [i for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install --no-deps ." in args]
    assert len(deps) == 1 and len(project) == 1, steps
    before = [args for i, args in copies if i < deps[0]]
    assert before == ["pyproject.toml ./"], before  # nothing else, or every code change re-installs torch
    code = [i for i, args in copies if any(d in args.split()[:-1] for d in ("models", "service", "workers", "."))]
    assert code and deps[0] < min(code) < project[0]
    # the deps layer installs exactly pyproject's dependencies
    snippet = re.search(r'python -c "(.*?)"', steps[deps[0]][1])
    assert snippet is not None
    listed = subprocess.run([sys.executable, "-c", snippet.group(1)], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed.stdout.split() == expected
    # the demo's sample-data packages stay out of the production image
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" not in re.sub(r"#.*", "", text).split("--no-deps .")[1]
    for name in ("animal-mnist", "animal_mnist", "foolbox"):
        assert name not in re.sub(r"#.*", "", text), name
