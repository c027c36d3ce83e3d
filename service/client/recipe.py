"""A job from a preset, a recipe file and ``--set`` overrides, merged in that order."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe file or a ``--set`` override that cannot be used (the message says which and why)."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top: mappings merge key by key, anything else replaces. Inputs are kept."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignment: str) -> dict[str, Any]:
    """``optimizer.lr=0.01`` -> ``{"optimizer": {"lr": 0.01}}``; the value is a YAML scalar (or flow list/map).

    ``a=`` sets null, ``a=true`` a boolean, ``a="3"`` the string ``"3"``.
    """
    path, sep, raw = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise RecipeError(f"--set {assignment!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {assignment!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
    out: dict[str, Any] = {}
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key.strip(), {})
    node[keys[-1].strip()] = value
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file: a JSON or YAML mapping of job fields."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{p}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of job fields, not a {type(data).__name__}")
    return data


def build_job(
    preset_job: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
    dataset_id: str | None = None,
) -> dict[str, Any]:
    """The preset's job, deep-merged with the recipe, then each ``--set``; ``dataset_id`` wins if given."""
    job = deep_merge(preset_job or {}, recipe or {})
    for assignment in sets:
        job = _set_into(job, assignment)
    if dataset_id:
        job["dataset_id"] = dataset_id
    if not job.get("dataset_id"):
        raise RecipeError("no dataset: pass --dataset ID or set dataset_id in the recipe")
    return job


def _set_into(job: dict[str, Any], assignment: str) -> dict[str, Any]:
    override = parse_set(assignment)
    # A dotted path through a value that is not a mapping would silently drop that value: refuse.
    node: Any = job
    for key in assignment.partition("=")[0].strip().split(".")[:-1]:
        node = node.get(key.strip()) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: {key.strip()!r} is {node!r}, not a mapping")
        if node is None:
            break
    return deep_merge(job, override)
