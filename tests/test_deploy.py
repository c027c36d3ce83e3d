"""Deployment files: the compose stack is valid and wires the same settings the code reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
# Set by .ci/run, which installs docker-compose first: there a missing docker-compose is a failure, not a skip.
REQUIRE_COMPOSE = "ZOOFIT_TEST_REQUIRE_COMPOSE"


def _compose_required() -> bool:
    return os.environ.get(REQUIRE_COMPOSE, "").strip().lower() not in ("", "0", "false", "no")


SECRETS = {"POSTGRES_PASSWORD": "pg-s3cret-for-the-test", "REDIS_PASSWORD": "redis-s3cret-for-the-test"}


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
