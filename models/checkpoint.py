"""A training run's state on disk, so a run cut short (a killed worker) can carry on.

``save_state`` writes a ``TrainState`` as one safetensors file: every tensor (weights, optimizer
moments, RNG states, the split, validation probabilities) as a tensor, everything else (the
epoch, metrics, the history, the optimizer's hyper-parameters) as JSON in the file's metadata.
Nothing is pickled, so loading a checkpoint never runs code. The file is written under a
temporary name and renamed over the previous one: a kill in the middle of a write leaves the
last complete checkpoint in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import DiskFullError, ZooError, is_disk_full
from .spec import EpochRecord
from .training import TrainedMember, TrainState
from .zoo import Preprocess

__all__ = ["STATE_FILE", "CheckpointError", "TrainState", "has_state", "load_state", "save_state"]

FORMAT = "zoofit-train-state"
FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
_TMP_PREFIX = f".{STATE_FILE}."
_TMP_SUFFIX = ".tmp"


class CheckpointError(ZooError):
    """A checkpoint that is missing, incomplete or not one this code reads."""


def has_state(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint (complete or not: ``load_state`` decides)."""
    return (Path(directory) / STATE_FILE).is_file()


def save_state(state: TrainState, directory: Path) -> Path:
    """Write ``state`` to ``directory/state.safetensors``, replacing the previous checkpoint atomically.

    Args:
        state: what ``train`` passed to its ``checkpoint`` callback.
        directory: the run's checkpoint folder (created if missing).

    Returns:
        The checkpoint file.

    Raises:
        DiskFullError: the disk or quota is full; the previous checkpoint is left as it was.
    """
    directory = Path(directory)
    target = directory / STATE_FILE
    tensors: dict[str, torch.Tensor] = {}
    doc = _pack(_state_tree(state), "s", tensors)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(doc)}
    tmp: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=directory)
        os.close(fd)
        _write(tensors, tmp, metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(directory)
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"disk full while writing the training checkpoint {target}") from exc
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target


def load_state(directory: Path) -> TrainState:
    """Read the checkpoint that ``save_state`` wrote to ``directory``.

    Args:
        directory: the run's checkpoint folder.

    Returns:
        The ``TrainState``, tensors on the CPU. Whether it fits the run about to start is for
        ``models.training.resume_problem`` (and ``train``) to decide.

    Raises:
        CheckpointError: no checkpoint, a damaged file, or another format or version.
    """
    path = Path(directory) / STATE_FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
                raise CheckpointError(
                    f"{path} is not a {FORMAT} v{FORMAT_VERSION} checkpoint (format={metadata.get('format')!r}, "
                    f"version={metadata.get('format_version')!r})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _state_from_tree(_unpack(json.loads(metadata["state"]), tensors))
    except CheckpointError:
        raise
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- TrainState <-> tree


def _state_tree(state: TrainState) -> dict[str, Any]:
    # Field by field rather than dataclasses.asdict, which would deep-copy every tensor.
    tree = {f.name: getattr(state, f.name) for f in fields(state)}
    tree["finished"] = [_member_tree(m) for m in state.finished]
    tree["history"] = [asdict(r) for r in state.history]
    return tree


def _member_tree(member: TrainedMember) -> dict[str, Any]:
    tree = {f.name: getattr(member, f.name) for f in fields(member)}
    tree["preprocess"] = member.preprocess.to_dict()
    return tree


def _state_from_tree(tree: dict[str, Any]) -> TrainState:
    tree["finished"] = [
        TrainedMember(**{**m, "preprocess": Preprocess.from_dict(m["preprocess"])}) for m in tree["finished"]
    ]
    tree["history"] = [EpochRecord(**r) for r in tree["history"]]
    for key in ("train_idx", "val_idx", "best_probs"):
        if not isinstance(tree[key], np.ndarray):
            raise TypeError(f"{key} is not an array")
    return TrainState(**tree)


# --------------------------------------------------------------------------- nested values <-> JSON + tensors
#
# Tensors and arrays become {"$tensor": key} / {"$array": key} with the data in the safetensors
# file; tuples and dicts whose keys are not plain strings (an optimizer's per-parameter state is
# keyed by int) get markers of their own, so everything comes back with the type it had.


def _pack(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor | np.ndarray):
        if key in tensors:  # dotted names can meet ("a.b" in "x" and "b" in "x.a"): keep both
            key = f"{key}#{len(tensors)}"
        if isinstance(obj, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
            return {"$array": key}
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"$tensor": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _pack(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"$items": [[_pack(k, f"{key}.{n}k", tensors), _pack(v, f"{key}.{n}", tensors)]
                           for n, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"$tuple": [_pack(v, f"{key}.{n}", tensors) for n, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, f"{key}.{n}", tensors) for n, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} (at {key}) in a checkpoint")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$array" in obj:
        return tensors[obj["$array"]].numpy()
    if "$tuple" in obj:
        return tuple(_unpack(v, tensors) for v in obj["$tuple"])
    if "$items" in obj:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["$items"]}
    return {k: _unpack(v, tensors) for k, v in obj.items()}


# --------------------------------------------------------------------------- files


def _write(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """The one place bytes go to disk (tests replace it to simulate a full disk)."""
    save_file(tensors, path, metadata=metadata)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
