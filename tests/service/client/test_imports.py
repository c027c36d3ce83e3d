"""The client runs where the service's own dependencies are not installed: it never imports them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = ("torch", "fastapi", "starlette", "sqlalchemy", "pydantic_settings", "pydantic", "celery", "numpy",
             "models", "workers")


def test_the_client_imports_none_of_the_service_dependencies():
    code = (
        "import json, sys\n"
        "import service.client, service.client.commands, service.client.watch\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    loaded = json.loads(out.stdout)
    assert "httpx" in loaded and "rich" in loaded  # the check sees real imports
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert bad == []
