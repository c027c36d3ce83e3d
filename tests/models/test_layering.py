"""The engine's import rules: pure ML below, torch-free package root and spec."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import models

ALLOWED_THIRD_PARTY = {"torch", "torchvision", "timm", "numpy", "PIL", "safetensors", "pydantic", "matplotlib"}


def test_package_root_and_spec_do_not_import_torch() -> None:
    code = "import sys, models, models.spec; sys.exit(any(m in sys.modules for m in ('torch', 'timm')))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_models_imports_only_the_ml_stack() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            bad = roots - stdlib - ALLOWED_THIRD_PARTY - {"__future__"}
            assert not bad, f"{path.name} imports {bad}"
