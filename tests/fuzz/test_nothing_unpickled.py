"""Nothing a user can influence is ever unpickled: a static scan of the shipped packages.

Stored models and checkpoints are safetensors (``tests/models/test_artifact.py::test_no_pickle_anywhere``,
``tests/models/test_checkpoint.py::test_state_round_trips_through_safetensors_only``); this test keeps
the loaders honest: ``torch.load`` only with ``weights_only=True``, ``numpy.load`` only with
``allow_pickle=False``, and ``pickle`` only on the trusted sample data inside an installed wheel.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "service", "workers")
# Trusted package data (the animal-mnist wheel), never an upload; see its module docstring.
PICKLE_ALLOWED = {"service/sample_data.py"}
# The export check runs the TorchScript file it has just written itself (never one from a user).
JIT_LOAD_ALLOWED = {"models/bundle.py"}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_no_loader_can_unpickle() -> None:
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 20  # the scan really sees the code
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for call, func in _calls(path):
            where = f"{rel}:{call.lineno} {func}(...)"
            if func.endswith("torch.load") and _kw(call, "weights_only") is not True:
                problems.append(where + " without weights_only=True")
            if func in ("np.load", "numpy.load") and _kw(call, "allow_pickle") is not False:
                problems.append(where + " without allow_pickle=False")
            if func.startswith(("pickle.", "cPickle.", "dill.", "joblib.")) and rel not in PICKLE_ALLOWED:
                problems.append(where)
            if func == "torch.package.PackageImporter" or (func == "torch.jit.load" and rel not in JIT_LOAD_ALLOWED):
                problems.append(where + " (can run stored code)")
    assert not problems, "\n".join(problems)
