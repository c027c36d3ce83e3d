"""``zoofit login`` stores the key in a 0600 file, atomically; --url / ZOOFIT_URL / ZOOFIT_API_KEY override it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from service.client import credentials


def test_saved_credentials_are_0600_and_hold_url_and_key(tmp_path):
    path = credentials.credentials_path({"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert path == tmp_path / "cfg" / "zoofit" / "credentials.json"
    old = os.umask(0o022)  # a umask that would leave a plainly created file world-readable
    try:
        credentials.save(path, "http://a:8000", "zf_one")
        credentials.save(path, "http://b:8000", "zf_two")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert json.loads(path.read_text()) == {
        "current": "http://b:8000", "keys": {"http://a:8000": "zf_one", "http://b:8000": "zf_two"},
    }
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temporary file left


def test_home_config_when_xdg_is_unset(tmp_path):
    assert credentials.credentials_path({"HOME": str(tmp_path)}) == tmp_path / ".config/zoofit/credentials.json"


def test_resolve_prefers_arguments_then_environment_then_the_stored_login(tmp_path):
    path = tmp_path / "credentials.json"
    credentials.save(path, "http://a:8000", "zf_a")
    credentials.save(path, "http://b:8000", "zf_b")
    assert credentials.resolve(None, {}, path) == credentials.Login("http://b:8000", "zf_b")
    assert credentials.resolve("http://a:8000/", {}, path) == credentials.Login("http://a:8000", "zf_a")
    env = {"ZOOFIT_URL": "a:8000", "ZOOFIT_API_KEY": "zf_env"}
    assert credentials.resolve(None, env, path) == credentials.Login("http://a:8000", "zf_env")
    assert credentials.resolve("http://c:1", {}, path).key is None


def test_resolve_without_any_login_says_how_to_log_in(tmp_path):
    with pytest.raises(credentials.NotLoggedIn, match="zoofit login"):
        credentials.resolve(None, {}, tmp_path / "none.json")
