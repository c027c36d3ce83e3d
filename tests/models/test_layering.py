"""The engine's import rules: pure ML below, torch-free package root and spec."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import models

ALLOWED_THIRD_PARTY = {
    "torch", "torchvision", "timm", "numpy", "PIL", "safetensors", "pydantic", "pydantic_core", "matplotlib",
    "onnx", "onnxruntime",
}


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


SERVING_MODULES = (
    "models.artifact",
    "models.ensemble",
    "models.plots",
    "service.app",
    "service.batching",
    "service.models_store",
    "service.api.routes.models",
)
TRAINING_MODULES = ("models.training", "models.member", "models.lbfgs", "models.sweep", "models.checkpoint")


def test_serving_path_imports_no_training_code() -> None:
    # A finder that makes the training modules unimportable, as if their files were absent.
    code = f"""
import importlib, importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {TRAINING_MODULES!r}:
            raise ImportError(f"{{name}} is absent")
        return None
sys.meta_path.insert(0, Absent())
for name in {SERVING_MODULES!r}:
    importlib.import_module(name)
from models.artifact import load_predictor, save_artifact
loaded = sorted(m for m in sys.modules if m in {TRAINING_MODULES!r})
sys.exit(f"imported {{loaded}}" if loaded else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_report_types_do_not_import_torch() -> None:
    # The API builds its schemas (and /openapi.json) from models.report without loading torch.
    code = (
        "import sys, models.report, models.runtime, models.units; "
        "sys.exit(any(m in sys.modules for m in ('torch', 'timm')))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
