"""A saved model's ``manifest.json``: what it holds, and reading it (torch-free).

The manifest describes the ensemble (classes, preprocessing, members, temperature, recipe,
library versions) and holds the model's evaluation report, the one stored copy of it
(``manifest["report"]``); ``manifest["metrics"]`` is the report's compact summary. The API reads
both through this module without importing torch; ``models.artifact`` writes the folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ZooError
from .report import finite_or_none

if TYPE_CHECKING:
    from .results import TrainResult
    from .spec import TrainSpec

FORMAT = "zoofit-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


class ArtifactError(ZooError):
    """A saved model folder that cannot be loaded (missing files, unknown format)."""


def manifest_for(result: TrainResult, spec: TrainSpec) -> dict[str, Any]:
    """The JSON manifest describing ``result`` (see ``models.artifact.save_artifact``)."""
    import timm
    import torch

    report = result.evaluation_report()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(result.classes),
        "preprocess": result.preprocess.to_dict(),
        "members": [
            {
                "backbone": m.backbone,
                "num_classes": m.num_classes,
                "drop_rate": m.drop_rate,
                "mean": list(m.preprocess.mean),
                "std": list(m.preprocess.std),
                "val_acc": m.val_acc,
                "val_loss": finite_or_none(m.val_loss),
                "best_epoch": m.best_epoch,
                "seed": m.seed,
                "head": dict(m.head),
                "served": m.served,
            }
            for m in result.members
        ],
        "metrics": report.summary().model_dump(mode="json"),
        "report": report.model_dump(mode="json"),
        "temperature": result.temperature,
        "spec": spec.model_dump(mode="json"),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the model folder ``path``.

    Raises:
        ArtifactError: no manifest, or not a zoofit model of a format this code reads.
    """
    file = Path(path) / MANIFEST_FILE
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {file}: {e}") from e
    return parse_manifest(data, str(file))


def parse_manifest(data: bytes, file: str) -> dict[str, Any]:
    """The manifest in ``data`` (read from ``file``, named in errors).

    Raises:
        ArtifactError: not JSON, or not a zoofit model of a format this code reads.
    """
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise ArtifactError(f"cannot read {file}: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"cannot read {file}: not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{file} is not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    return manifest


def without_report(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest less its report: what a database row keeps beside the model folder."""
    return {k: v for k, v in manifest.items() if k != "report"}
