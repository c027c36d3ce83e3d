"""A training run's state, and that state on disk, so a run cut short (a killed worker) can carry on.

``TrainState`` is where a run stands at the end of an epoch; ``run_fingerprint`` and
``resume_problem`` say whether a state belongs to a recipe and its data; ``rng_state`` and
``set_rng_state`` carry every random generator across the break.

``save_state`` writes a ``TrainState`` as one safetensors file: every tensor (weights, optimizer
moments, RNG states, the split, validation probabilities) as a tensor, everything else (the
epoch, metrics, the history, the optimizer's hyper-parameters) as JSON in the file's metadata.
Nothing is pickled, so loading a checkpoint never runs code. The file is written under a
temporary name and renamed over the previous one: a kill in the middle of a write leaves the
last complete checkpoint in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .data import ImageArray, stratified_split
from .errors import DiskFullError, ZooError, is_disk_full
from .optim import cycle_ends
from .results import TrainedMember
from .spec import EpochRecord, TrainSpec
from .zoo import Preprocess

__all__ = [
    "STATE_FILE",
    "CheckpointError",
    "TrainState",
    "has_state",
    "load_state",
    "resume_problem",
    "rng_state",
    "run_fingerprint",
    "save_state",
    "set_rng_state",
]

FORMAT = "zoofit-train-state"
FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
_TMP_PREFIX = f".{STATE_FILE}."
_TMP_SUFFIX = ".tmp"


class CheckpointError(ZooError):
    """A checkpoint that is missing, incomplete or not one this code reads."""


@dataclass
class TrainState:
    """Where a ``train`` run stands at the end of an epoch: enough to carry on as if it never stopped.

    ``train`` hands one to its ``checkpoint`` callback after every epoch and continues from one
    given as ``resume``; ``models.checkpoint`` stores it on disk. Tensors may share memory with
    the live model and optimizer, so a callback must write (or copy) them before it returns.

    Attributes:
        member: ensemble index of the member being trained (0-based).
        epoch: that member's last finished epoch (0-based, like ``EpochRecord.epoch``).
        member_done: the member trains no further (its last epoch, or early stopping).
        fingerprint: the recipe, data and library versions the run belongs to (``run_fingerprint``).
        train_idx: training indices of the split.
        val_idx: validation indices of the split.
        model: the member's current weights.
        optimizer: the optimizer's ``state_dict()``.
        scheduler: the learning-rate scheduler's ``state_dict()``.
        scaler: the fp16 ``GradScaler``'s ``state_dict()``, when one is used.
        best_state: the member's best weights so far (CPU).
        best_epoch: epoch of ``best_state``.
        best_acc: validation accuracy of ``best_state``.
        best_loss: validation loss of ``best_state``.
        best_probs: validation probabilities of ``best_state``, ``float32 [V, C]``.
        since_best: epochs without improvement (the early-stopping counter).
        rng: generator states: ``torch``, ``cuda`` (one per GPU), ``numpy`` and ``python`` (the
            global ones) and ``batches`` (the member's batch-order generator).
        finished: the members already trained.
        finished_probs: their validation probabilities (for the ensemble's metrics).
        history: every epoch record so far, in order.
        ema: the member's exponential-moving-average weights, when ``ensemble.ema``.
        best_kind: which weights ``best_state`` holds: ``raw`` or ``ema``.
        member_epochs: the epochs of the member in training: the recipe's, or fewer for a member a
            time budget shortened (``models.training``); None in checkpoints written before it was kept.
    """

    member: int
    epoch: int
    member_done: bool
    fingerprint: dict[str, str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_acc: float
    best_loss: float
    best_probs: np.ndarray
    since_best: int
    rng: dict[str, Any]
    finished: list[TrainedMember]
    finished_probs: list[np.ndarray]
    history: list[EpochRecord]
    ema: dict[str, torch.Tensor] | None = None
    best_kind: str = "raw"
    member_epochs: int | None = None


def run_fingerprint(data: ImageArray, spec: TrainSpec) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the recipe, the data and the library versions."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((list(data.classes), data.images.shape, data.labels.dtype.str)).encode())
    h.update(np.ascontiguousarray(data.labels).data)
    h.update(np.ascontiguousarray(data.images).data)
    return {
        "spec": hashlib.sha256(spec.model_dump_json().encode()).hexdigest(),
        "data": h.hexdigest(),
        "versions": f"torch {torch.__version__}, timm {timm.__version__}",
    }


def resume_problem(
    state: TrainState, data: ImageArray, spec: TrainSpec, *, fingerprint: dict[str, str] | None = None
) -> str | None:
    """Why ``state`` cannot continue training ``spec`` on ``data``; None when it can.

    ``train`` checks this itself (and starts from the beginning when there is a problem); callers
    that record a resume elsewhere (the worker's job history) check it first.

    Args:
        state: a loaded checkpoint.
        data: the images about to be trained on.
        spec: the recipe about to be trained.
        fingerprint: ``run_fingerprint(data, spec)`` when the caller has it already.
    """
    want = fingerprint or run_fingerprint(data, spec)
    have = state.fingerprint
    if have.get("spec") != want["spec"]:
        return "it was written for another recipe"
    if have.get("data") != want["data"]:
        return "it was written for other images"
    if have.get("versions") != want["versions"]:
        return f"it was written by {have.get('versions')}, this is {want['versions']}"
    backbones = spec.member_backbones()
    epochs = spec.epochs if state.member_epochs is None else state.member_epochs
    if not 0 <= state.member < len(backbones) or not 0 <= state.epoch < epochs <= spec.epochs:
        return f"member {state.member} epoch {state.epoch} is outside the recipe"
    if spec.ensemble.snapshot:
        ends = cycle_ends(spec.epochs, spec.ensemble.members)
        done = sum(1 for e in ends if e <= state.epoch)
        if state.member != 0 or len(state.finished) != done or len(state.finished_probs) != done:
            return f"it holds {len(state.finished)} snapshots, expected {done}"
    elif len(state.finished) != state.member or len(state.finished_probs) != state.member:
        return f"it holds {len(state.finished)} finished members, expected {state.member}"
    elif [m.backbone for m in state.finished] != backbones[: state.member]:
        return "its finished members have other backbones"
    train_idx, val_idx = stratified_split(data.labels, spec.val_fraction, spec.seed)
    if not (np.array_equal(state.train_idx, train_idx) and np.array_equal(state.val_idx, val_idx)):
        return "its train/validation split differs from this one"
    expected = state.epoch + 1
    if not spec.ensemble.snapshot:
        expected += sum(m.epochs_run for m in state.finished)
    if len(state.history) != expected or [(r.member, r.epoch) for r in state.history[-1:]] != [
        (state.member, state.epoch)
    ]:
        return f"its history has {len(state.history)} epochs, expected {expected}"
    return None


def rng_state(batches: np.random.Generator) -> dict[str, Any]:
    """Every random generator a run draws from: torch (and CUDA), numpy's and Python's global ones, ``batches``."""
    np_state = cast(tuple[Any, ...], np.random.get_state())  # legacy form: (name, keys, pos, gauss...)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
        "batches": batches.bit_generator.state,
    }


def set_rng_state(rng: dict[str, Any], batches: np.random.Generator) -> None:
    """Put back what ``rng_state`` took (``batches`` is the member's batch-order generator)."""
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda") or []
    # A run moved to another machine keeps going, only its CUDA randomness differs.
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(rng["python"])
    batches.bit_generator.state = rng["batches"]


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
