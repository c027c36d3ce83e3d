"""Stored logins: ``$XDG_CONFIG_HOME/zoofit/credentials.json`` (else ``~/.config/zoofit/``), mode 0600.

The file maps each API URL to its key and remembers the last one logged in to::

    {"current": "http://gpu-box:8000", "keys": {"http://gpu-box:8000": "zf_..."}}

It is written to a temporary file that :func:`tempfile.mkstemp` creates with mode 0600, then renamed
over the old one: it is never readable by others, not even for an instant, and a crash mid-write
leaves the previous file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class NotLoggedIn(Exception):
    """No URL (or no key) from the arguments, the environment or the stored login."""


@dataclass(frozen=True)
class Login:
    url: str
    key: str | None


def credentials_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "zoofit" / "credentials.json"


def load(path: Path) -> dict[str, Any]:
    """The stored logins, or an empty set of them when there is no file yet."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"current": None, "keys": {}}
    except (OSError, ValueError) as exc:
        raise NotLoggedIn(f"cannot read {path}: {exc}") from exc
    return {"current": data.get("current"), "keys": dict(data.get("keys") or {})}


def save(path: Path, url: str, key: str) -> None:
    """Store ``key`` for ``url`` and make ``url`` the current login (atomically, mode 0600)."""
    data = load(path)
    data["keys"][url] = key
    data["current"] = url
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def resolve(url: str | None, env: Mapping[str, str] | None = None, path: Path | None = None) -> Login:
    """The API to talk to: ``url`` (``--url``), else ``ZOOFIT_URL``, else the stored current login.

    The key is ``ZOOFIT_API_KEY`` if set, else the one stored for that URL (None if there is none).
    """
    env = os.environ if env is None else env
    stored = load(path or credentials_path(env))
    chosen = url or env.get("ZOOFIT_URL") or stored["current"]
    if not chosen:
        raise NotLoggedIn("no API URL: run `zoofit login URL`, pass --url, or set ZOOFIT_URL")
    chosen = normalize_url(chosen)
    return Login(chosen, env.get("ZOOFIT_API_KEY") or stored["keys"].get(chosen))
