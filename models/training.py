"""Fine-tune one or more backbones on a decoded image array.

``train`` is the whole job: seeded stratified split, then for each ensemble member a backbone
with its pretrained weights, the freeze policy, optimizer and schedule from the spec, epochs
with validation, best-epoch weights and early stopping; finally the ensemble (average of the
members' probabilities) is evaluated on the same validation split.

After every epoch ``train`` can hand its whole state (``TrainState``) to a ``checkpoint``
callback, and it can start from such a state (``resume``) instead of from scratch;
``models.checkpoint`` keeps the state on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageArray, stratified_split
from .ensemble import Ensemble
from .errors import TrainingCancelled, TrainingError
from .evaluation import calibration_report, classification_report, training_curves
from .freezing import FreezeReport, apply_freeze, parameter_groups, set_train_mode
from .heads import HeadConfig, batch_mixer, create_classifier, train_criterion
from .optim import create_optimizer, create_scheduler, create_snapshot_scheduler, cycle_ends
from .runtime import available_cpus, num_threads, resolve_device
from .prefix import (
    CachePlan,
    FeatureCache,
    Step,
    build_cache,
    cache_problem,
    forward_steps,
    frozen_prefix,
    model_steps,
    set_prefix_eval,
)
from .spec import EpochRecord, FreezeSpec, TrainSpec
from .transforms import augment_batch, augment_transform, normalize_batch, normalize_transform
from .zoo import Preprocess, count_parameters, preprocess_for

EVAL_BATCH = 128


@dataclass
class TrainedMember:
    """One trained ensemble member.

    Attributes:
        backbone: timm model name.
        seed: the member's seed (``spec.seed + i``).
        state_dict: best-epoch weights, CPU tensors.
        num_classes: classifier outputs.
        drop_rate: head dropout.
        preprocess: the member's normalisation (image size shared by all members).
        best_epoch: 0-based index of the epoch whose weights were kept (like ``EpochRecord.epoch``).
        epochs_run: epochs actually trained (fewer than ``epochs_planned`` after early stopping).
        epochs_planned: ``spec.epochs``.
        val_acc: validation accuracy of the kept weights.
        val_loss: validation cross-entropy of the kept weights.
        freeze: ``FreezeReport.to_dict()`` (mode, frozen groups, trainable/total params).
        head: ``HeadConfig.to_dict()``: dropout, DropConnect, drop-path and pooling of the head.
        served: which weights these are: ``raw``, ``ema`` (Polyak average) or ``snapshot``.
    """

    backbone: str
    seed: int
    state_dict: dict[str, torch.Tensor]
    num_classes: int
    drop_rate: float
    preprocess: Preprocess
    best_epoch: int
    epochs_run: int
    epochs_planned: int
    val_acc: float
    val_loss: float
    freeze: dict[str, Any]
    head: dict[str, Any] = field(default_factory=dict)
    served: str = "raw"

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping ended this member's training."""
        return self.epochs_run < self.epochs_planned

    def build(self) -> nn.Module:
        """The member as an eval-mode CPU module with its trained weights."""
        model = create_classifier(
            self.backbone,
            weights="none",
            num_classes=self.num_classes,
            head=HeadConfig.from_dict({"drop_rate": self.drop_rate, **self.head}),
            image_size=self.preprocess.image_size,
        )
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class TrainResult:
    """Everything ``train`` produced.

    Attributes:
        members: the trained members, in order.
        classes: class names (label ``i`` is ``classes[i]``).
        preprocess: input preprocessing of the ensemble (the first member's).
        val_acc: ensemble validation accuracy.
        val_loss: ensemble validation loss (negative log of the averaged probability).
        member_val_acc: each member's validation accuracy.
        history: every member's epoch records, in order.
        seconds: wall time of ``train``.
        device: where it ran (``cpu``, ``cuda:0``...).
        amp: mixed-precision dtype name, or None.
        train_size: training images.
        val_size: validation images.
        split_counts: per class ``[train, val]`` image counts.
        evaluation: ``classification_report`` of the ensemble on the validation split.
        calibration: ``calibration_report`` (ECE/NLL before and after temperature scaling).
        temperature: the fitted temperature that ``Predictor`` applies to the averaged probabilities.
        applied: what the run actually did, per member: the transfer strategy (and why, for
            ``auto``), the frozen-prefix cache path, optimizer groups, EMA, snapshots, selection.
        comparison: raw, EMA and ensemble validation accuracy side by side.
        sections: further report sections from outside ``train`` (``sweep``: the search that chose the recipe).
    """

    members: list[TrainedMember]
    classes: list[str]
    preprocess: Preprocess
    val_acc: float
    val_loss: float
    member_val_acc: list[float]
    history: list[EpochRecord]
    seconds: float
    device: str
    amp: str | None
    train_size: int
    val_size: int
    split_counts: dict[str, list[int]] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    applied: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)

    def build_ensemble(self) -> Ensemble:
        """The trained ensemble as an eval-mode CPU module (input normalised with ``preprocess``)."""
        return Ensemble(
            [m.build() for m in self.members],
            input_norm=(self.preprocess.mean, self.preprocess.std),
            member_norms=[(m.preprocess.mean, m.preprocess.std) for m in self.members],
        ).eval()

    def report(self) -> dict[str, Any]:
        """The JSON-safe evaluation report stored with the model.

        Ensemble and member metrics, parameters, split sizes and device, plus ``evaluation``
        (per-class precision/recall/F1/support, confusion matrix, top-k accuracy on the validation
        split), ``calibration`` (ECE and NLL before/after temperature scaling, reliability bins),
        ``temperature`` and ``curves`` (per member and epoch: losses, accuracies, learning rate).
        """
        train_seconds = sum(r.seconds for r in self.history)
        return {
            "val_acc": self.val_acc,
            "val_loss": _num(self.val_loss),
            "member_val_acc": list(self.member_val_acc),
            "members": [
                {
                    "backbone": m.backbone,
                    "seed": m.seed,
                    "val_acc": m.val_acc,
                    "val_loss": _num(m.val_loss),
                    "best_epoch": m.best_epoch,
                    "epochs_run": m.epochs_run,
                    "stopped_early": m.stopped_early,
                    "trainable_params": int(m.freeze["trainable_params"]),
                    "total_params": int(m.freeze["total_params"]),
                    "freeze_mode": m.freeze["mode"],
                    "frozen_groups": list(m.freeze["frozen_groups"]),
                    "head": dict(m.head),
                    "served": m.served,
                }
                for m in self.members
            ],
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "train_size": self.train_size,
            "val_size": self.val_size,
            "split_counts": {k: list(v) for k, v in self.split_counts.items()},
            "image_size": self.preprocess.image_size,
            "device": self.device,
            "amp": self.amp,
            "seconds": round(self.seconds, 3),
            "epoch_seconds": round(train_seconds, 3),
            "temperature": self.temperature,
            "evaluation": self.evaluation,
            "calibration": self.calibration,
            "curves": training_curves(self.history, _curve_best_epochs(self)),
            "applied": self.applied,
            "comparison": self.comparison,
            **self.sections,
        }


def _curve_best_epochs(result: TrainResult) -> list[int]:
    # One entry per trained run (a snapshot ensemble is one run with several members).
    runs = sorted({r.member for r in result.history})
    best = {i: m.best_epoch for i, m in enumerate(result.members)}
    return [best.get(i, 0) for i in runs]


def _num(x: float) -> float | None:
    # JSON has no inf/nan; a metric that is not finite is reported as null.
    return float(x) if math.isfinite(x) else None


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
    if not 0 <= state.member < len(backbones) or not 0 <= state.epoch < spec.epochs:
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


def _rng_state(batches: np.random.Generator) -> dict[str, Any]:
    np_state = cast(tuple[Any, ...], np.random.get_state())  # legacy form: (name, keys, pos, gauss...)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
        "batches": batches.bit_generator.state,
    }


def _set_rng_state(rng: dict[str, Any], batches: np.random.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda") or []
    # A run moved to another machine keeps going, only its CUDA randomness differs.
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(rng["python"])
    batches.bit_generator.state = rng["batches"]


def check_trainable(data: ImageArray) -> None:
    """Raise ``TrainingError`` unless every class has at least 2 images (one per split).

    Raises:
        TrainingError: fewer than 2 classes, or a class with fewer than 2 images.
    """
    if len(data.classes) < 2:
        raise TrainingError(f"need at least 2 classes to train a classifier, got {len(data.classes)}")
    counts = data.counts()
    few = {c: n for c, n in counts.items() if n < 2}
    if few:
        listing = ", ".join(f"{c!r} ({n})" for c, n in few.items())
        raise TrainingError(
            f"every class needs at least 2 images (one for training, one for validation); too few: {listing}"
        )



# --------------------------------------------------------------------------- strategies


# The lecture's rule for transfer learning, in training images per class: with very little data
# train only a linear classifier on the pretrained features; with more, fine-tune the top of the
# network; with a lot, fine-tune all of it; whatever is fine-tuned trains at a lower lr than the
# new head (the pretrained weights are already good).
AUTO_LINEAR_BELOW = 40
AUTO_PARTIAL_BELOW = 250
AUTO_TOP_GROUPS = 2
AUTO_BACKBONE_LR_MULT = 0.1


def resolve_transfer(freeze: FreezeSpec, per_class: float, n_groups: int) -> tuple[FreezeSpec, str]:
    """The concrete transfer strategy for ``freeze.mode == 'auto'`` (others pass through).

    Args:
        freeze: the job's transfer settings.
        per_class: mean training images per class.
        n_groups: the model's parameter groups (``parameter_groups``), head group included.

    Returns:
        The strategy to run and a sentence saying why.
    """
    if freeze.mode != "auto":
        return freeze, f"as requested: {freeze.mode}"
    backbone_groups = n_groups - 1
    if per_class < AUTO_LINEAR_BELOW:
        chosen = freeze.model_copy(update={"mode": "linear_probe"})
        why = (
            f"{per_class:.0f} training images per class (< {AUTO_LINEAR_BELOW}): too little data to fine-tune "
            "without overfitting, so only the new classifier trains on the pretrained features"
        )
    elif per_class < AUTO_PARTIAL_BELOW:
        stages = max(backbone_groups - AUTO_TOP_GROUPS, 0)
        chosen = freeze.model_copy(
            update={
                "mode": "first_n",
                "stages": stages,
                "backbone_lr_mult": min(freeze.backbone_lr_mult, AUTO_BACKBONE_LR_MULT),
            }
        )
        why = (
            f"{per_class:.0f} training images per class ({AUTO_LINEAR_BELOW}-{AUTO_PARTIAL_BELOW - 1}): "
            f"fine-tune the top {AUTO_TOP_GROUPS} stages (freeze the first {stages} of {backbone_groups}) at "
            f"{chosen.backbone_lr_mult:g} x lr, the new classifier at lr"
        )
    else:
        chosen = freeze.model_copy(
            update={"mode": "none", "backbone_lr_mult": min(freeze.backbone_lr_mult, AUTO_BACKBONE_LR_MULT)}
        )
        why = (
            f"{per_class:.0f} training images per class (>= {AUTO_PARTIAL_BELOW}): enough data to fine-tune "
            f"every layer, the backbone at {chosen.backbone_lr_mult:g} x lr"
        )
    return chosen, why


def gradual_freeze(freeze: FreezeSpec, epoch: int, n_groups: int) -> tuple[str, int]:
    """``(mode, stages)`` for ``apply_freeze`` in ``epoch`` of a gradual-unfreezing run.

    Epochs ``0..k-1`` train the classifier only; then one more backbone group trains, from the top,
    every ``k = unfreeze_every`` epochs, until only the first ``freeze.stages`` groups stay frozen.
    """
    unfrozen = epoch // freeze.unfreeze_every
    if unfrozen == 0:
        return "linear_probe", n_groups - 1
    return "first_n", max(freeze.stages, n_groups - 1 - unfrozen)


def greedy_selection(member_probs: list[np.ndarray], labels: np.ndarray) -> tuple[list[int], list[float]]:
    """Greedy forward selection of ensemble members on validation (Caruana et al., 2004).

    Starts from the member with the lowest validation NLL and keeps adding the member whose
    addition lowers the NLL of the averaged probabilities most, while it does (no repeats).

    Returns:
        The chosen member indices in the order added, and the NLL after each addition.
    """
    def nll(p: np.ndarray) -> float:
        return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())

    left = list(range(len(member_probs)))
    chosen: list[int] = []
    path: list[float] = []
    total = np.zeros_like(member_probs[0], dtype=np.float64)
    best = math.inf
    while left:
        scores = [(nll((total + member_probs[j]) / (len(chosen) + 1)), j) for j in left]
        score, j = min(scores)
        if chosen and score >= best - 1e-9:
            break
        chosen.append(j)
        left.remove(j)
        total += member_probs[j]
        best = score
        path.append(score)
    return chosen, path


def _active_drop_paths(modules: list[nn.Module]) -> int:
    """Residual blocks among ``modules`` whose branch stochastic depth can drop (timm ``DropPath``)."""
    from timm.layers import DropPath

    seen: set[int] = set()
    for root in modules:
        for block in root.modules():
            dp = getattr(block, "drop_path", None)
            if isinstance(dp, DropPath) and dp.drop_prob > 0 and getattr(block, "has_skip", True):
                seen.add(id(block))
    return len(seen)


def polyak(model: nn.Module, decay: float) -> Any:
    """Polyak averaging: timm's ``ModelEmaV3`` of ``model``, ``ema = decay * ema + (1 - decay) * w``
    after every optimizer step (``.update(model)``), buffers included, no warm-up of the decay."""
    from timm.utils.model_ema import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=False)


# --------------------------------------------------------------------------- one run


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class _Best:
    """Best weights so far by the monitored metric, over raw and (when served) EMA weights."""

    monitor: str
    score: tuple[float, float] | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    acc: float = 0.0
    loss: float = math.inf
    probs: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))
    kind: str = "raw"
    since: int = 0

    def key(self, acc: float, loss: float) -> tuple[float, float]:
        return (acc, -loss) if self.monitor == "val_acc" else (-loss, acc)

    def offer(self, epoch: int, kind: str, acc: float, loss: float, probs: np.ndarray, model: nn.Module) -> bool:
        score = self.key(acc, loss)
        if self.score is not None and score <= self.score:
            return False
        self.score, self.epoch, self.kind = score, epoch, kind
        self.acc, self.loss, self.probs = acc, loss, probs
        self.state = _state_copy(model)
        return True


class _Run:
    """Shared state of one ``train`` call: data on the device, split, callbacks, precision."""

    def __init__(
        self,
        data: ImageArray,
        spec: TrainSpec,
        device: torch.device,
        on_epoch: Callable[[EpochRecord], None] | None,
        should_stop: Callable[[], bool] | None,
        log: Callable[[str], None] | None,
        checkpoint: Callable[[TrainState], None] | None = None,
        resume: TrainState | None = None,
        cache_memory_bytes: int = 2 * 1024**3,
        cache_disk_bytes: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.on_epoch = on_epoch
        self.should_stop = should_stop
        self.log = log or (lambda _msg: None)
        self.checkpoint = checkpoint
        self.cache_memory_bytes = cache_memory_bytes
        self.cache_disk_bytes = cache_disk_bytes
        self.cache_dir = cache_dir
        self.num_classes = len(data.classes)
        self.history: list[EpochRecord] = []
        self.members: list[TrainedMember] = []
        self.member_probs: list[np.ndarray] = []
        self.applied: list[dict[str, Any]] = []
        self.train_idx, self.val_idx = stratified_split(data.labels, spec.val_fraction, spec.seed)
        self.fingerprint = run_fingerprint(data, spec) if checkpoint is not None or resume is not None else {}
        self.resume: TrainState | None = None
        if resume is not None:
            problem = resume_problem(resume, data, spec, fingerprint=self.fingerprint)
            if problem is None:
                self.resume = resume
                self.history = list(resume.history)
                self.members = list(resume.finished)
                self.member_probs = list(resume.finished_probs)
            else:
                self.log(f"not resuming from the checkpoint: {problem}; training from the start")
        # On a GPU the whole uint8 array lives there, so augmentation runs there too.
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.train_labels = self.labels[torch.from_numpy(self.train_idx).to(device)]
        self.val_labels = self.labels[torch.from_numpy(self.val_idx).to(device)]
        self.per_class = len(self.train_idx) / max(self.num_classes, 1)
        self.cuda = device.type == "cuda"
        self.amp_dtype: torch.dtype | None = None
        if self.cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled("training cancelled")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _input(self, dataset_idx: np.ndarray, pre: Preprocess, augment: Any = None) -> torch.Tensor:
        idx = torch.from_numpy(dataset_idx).to(self.device)
        if augment is None:
            x = normalize_batch(self.images[idx], pre, self.device)
        else:
            x = normalize_transform(pre)(augment_batch(self.images[idx].permute(0, 3, 1, 2), augment))
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def evaluate(
        self,
        model: nn.Module,
        pre: Preprocess,
        steps: list[Step] | None = None,
        cache: FeatureCache | None = None,
        cached: int = 0,
    ) -> tuple[float, float, np.ndarray]:
        """Validation loss, accuracy and probabilities ``[V, C]`` (from cached features when given)."""
        model.eval()
        probs, loss_sum = [], 0.0
        with torch.inference_mode():
            for start in range(0, len(self.val_idx), EVAL_BATCH):
                rows = np.arange(start, min(start + EVAL_BATCH, len(self.val_idx)))
                with self.autocast():
                    if cache is not None and steps is not None:
                        out = forward_steps(steps, cache.val_batch(rows), cached)
                    else:
                        out = model(self._input(self.val_idx[rows], pre))
                logits = out.float()
                y = self.val_labels[torch.from_numpy(rows).to(self.device)]
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                probs.append(logits.softmax(dim=-1).cpu())
        p = torch.cat(probs).numpy()
        y_all = self.val_labels.cpu().numpy()
        return loss_sum / len(self.val_idx), float((p.argmax(1) == y_all).mean()), p

    def _cache_for(
        self, steps: list[Step] | None, n: int, fs: FreezeSpec, pre: Preprocess, augment: Any, seed: int
    ) -> tuple[FeatureCache | None, CachePlan]:
        spec = self.spec
        problem = cache_problem(
            family_supported=steps is not None,
            mode=spec.cache.mode,
            train_bn=fs.train_bn,
            mixes=spec.augment.mixes,
            prefix_steps=n,
        )
        if problem is not None or steps is None:
            return None, CachePlan("off", problem or "no steps")
        views = spec.cache.views if spec.augment.enabled else 1

        def train_inputs(view: int, rows: np.ndarray) -> torch.Tensor:
            # Augmented views are drawn under a fixed seed (below): a resumed run rebuilds the same ones.
            return self._input(self.train_idx[rows], pre, augment)

        t0 = time.perf_counter()
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 7919 + 17)
            cache, plan = build_cache(
                steps,
                n,
                train_inputs=train_inputs,
                val_inputs=lambda rows: self._input(self.val_idx[rows], pre),
                n_train=len(self.train_idx),
                n_val=len(self.val_idx),
                views=views,
                device=self.device,
                memory_bytes=self.cache_memory_bytes,
                disk_bytes=self.cache_disk_bytes,
                spill_dir=self.cache_dir,
                batch=EVAL_BATCH,
                autocast=self.autocast if self.cuda else None,
                should_stop=self.check_stop,
            )
        if cache is not None:
            self.log(f"frozen-prefix cache ({plan.path}): {plan.reason}; built in {time.perf_counter() - t0:.1f}s")
        return cache, plan

    def train_member(self, i: int, backbone: str, shared: Preprocess, resume: TrainState | None = None) -> None:
        """Train member ``i`` (or, for a snapshot ensemble, every snapshot) into ``self.members``."""
        spec = self.spec
        snapshot = spec.ensemble.snapshot
        seed = spec.seed + i
        torch.manual_seed(seed)
        np.random.seed(seed)  # timm's Mixup draws from numpy's global generator
        rng = np.random.default_rng(seed)
        pre = preprocess_for(backbone, shared.image_size)
        pre = Preprocess(pre.mean, pre.std, shared.interpolation, shared.image_size)
        head = HeadConfig.from_spec(spec)
        model = create_classifier(
            backbone,
            # Resuming: every weight comes from the checkpoint, so nothing is loaded or downloaded.
            weights="none" if resume is not None else spec.weights,
            num_classes=self.num_classes,
            head=head,
            image_size=shared.image_size,
        )
        n_groups = len(parameter_groups(model))
        fs, why = resolve_transfer(spec.freeze, self.per_class, n_groups)
        gradual = fs.mode == "gradual"
        # The optimizer holds every parameter that ever trains; gradual unfreezing only flips
        # requires_grad (a parameter without a gradient is skipped by every torch optimizer).
        final_mode = "first_n" if gradual else fs.mode
        freeze: FreezeReport = apply_freeze(model, mode=final_mode, stages=fs.stages, train_bn=fs.train_bn)
        steps = model_steps(model)
        n_cache = frozen_prefix(steps) if steps is not None else 0
        lbfgs = spec.optimizer.name == "lbfgs"
        optimizer: torch.optim.Optimizer | None = None
        if not lbfgs:
            optimizer = create_optimizer(
                model, spec.optimizer, backbone_lr_mult=fs.backbone_lr_mult, layer_decay=fs.layer_decay
            )
        if gradual:
            mode, stages = gradual_freeze(fs, 0, n_groups)
            freeze = apply_freeze(model, mode=mode, stages=stages, train_bn=fs.train_bn)
        model.to(self.device)
        if self.cuda:
            model.to(memory_format=torch.channels_last)
        head_params = {id(p) for p in cast(Any, model).get_classifier().parameters()}
        head_group = 0
        scheduler: Any = None
        if optimizer is not None:
            head_group = next(
                (
                    g
                    for g, group in enumerate(optimizer.param_groups)
                    if any(id(p) in head_params for p in group["params"])
                ),
                0,
            )
            if snapshot:
                scheduler = create_snapshot_scheduler(
                    optimizer, spec.schedule, epochs=spec.epochs, cycles=spec.ensemble.members
                )
            else:
                scheduler = create_scheduler(optimizer, spec.schedule, epochs=spec.epochs)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        ema: Any = None
        if spec.ensemble.ema:
            ema = polyak(model, spec.ensemble.ema_decay)
        augment = augment_transform(spec.augment, pre) if spec.augment.enabled else None
        mixer = batch_mixer(spec.augment, self.num_classes, spec.label_smoothing)
        criterion = train_criterion(spec)
        trainable, total = count_parameters(model)
        self.log(
            f"member {i + 1}/{spec.ensemble.members}: {backbone} ({spec.weights} weights, seed {seed}), "
            f"{trainable:,}/{total:,} parameters trainable, frozen: {', '.join(freeze.frozen_groups) or '-'}"
            + (f"; auto: {why}" if spec.freeze.mode == "auto" else "")
        )
        # Frozen steps run in eval mode in every path (BatchNorm statistics fixed, no drop-path).
        model.eval()
        cache, plan = self._cache_for(steps, n_cache, fs, pre, augment, seed)
        applied: dict[str, Any] = {
            "member": i,
            "backbone": backbone,
            "transfer": {
                "mode": fs.mode,
                "requested": spec.freeze.mode,
                "stages": fs.stages,
                "why": why,
                "backbone_lr_mult": fs.backbone_lr_mult,
                "layer_decay": fs.layer_decay,
                "train_bn": fs.train_bn,
            },
            "cache": plan.to_dict(),
            "optimizer": spec.optimizer.name,
            "param_groups": (
                [{"lr": float(g["lr"]), "params": len(g["params"]), "weight_decay": float(g.get("weight_decay", 0))}
                 for g in optimizer.param_groups]
                if optimizer is not None
                else []
            ),
            "schedule": "snapshot cyclic cosine" if snapshot else spec.schedule.name,
            "head": head.to_dict(),
            "augment": None if augment is None else repr(augment),
            "mixup": mixer is not None,
            "label_smoothing": spec.label_smoothing,
            "ema": spec.ensemble.ema,
        }
        if spec.drop_path > 0:
            active = _active_drop_paths([m for st in steps[n_cache:] for m in st.modules] if steps else [model])
            applied["drop_path"] = {"rate": spec.drop_path, "active_blocks": active}
            if active == 0:
                applied["drop_path"]["note"] = (
                    "no residual block trains, so stochastic depth has nothing to drop (frozen blocks run in eval)"
                )
                self.log(f"member {i + 1}: drop_path {spec.drop_path} has no effect: {applied['drop_path']['note']}")
        try:
            if lbfgs:
                self._train_lbfgs(i, backbone, model, steps, cache, pre, seed, freeze, head, applied)
            else:
                assert optimizer is not None
                self._train_sgd(
                    i, backbone, model, steps, cache, n_cache, pre, seed, rng, freeze, fs, n_groups, head,
                    optimizer, scheduler, head_group, scaler, ema, augment, mixer, criterion, resume, applied,
                )
        finally:
            if cache is not None:
                cache.close()
        self.applied.append(applied)

    def _member(
        self, backbone: str, seed: int, state: dict[str, torch.Tensor], pre: Preprocess, best: _Best,
        epochs_run: int, freeze: FreezeReport, head: HeadConfig, served: str,
    ) -> TrainedMember:
        return TrainedMember(
            backbone=backbone,
            seed=seed,
            state_dict=state,
            num_classes=self.num_classes,
            drop_rate=head.drop_rate,
            preprocess=pre,
            best_epoch=best.epoch,
            epochs_run=epochs_run,
            epochs_planned=self.spec.epochs,
            val_acc=best.acc,
            val_loss=best.loss,
            freeze=freeze.to_dict(),
            head=head.to_dict(),
            served=served,
        )

    def _train_sgd(
        self, i: int, backbone: str, model: nn.Module, steps: list[Step] | None, cache: FeatureCache | None,
        n_cache: int, pre: Preprocess, seed: int, rng: np.random.Generator, freeze: FreezeReport, fs: FreezeSpec,
        n_groups: int, head: HeadConfig, optimizer: torch.optim.Optimizer, scheduler: Any, head_group: int,
        scaler: Any, ema: Any, augment: Any, mixer: Any, criterion: Any, resume: TrainState | None,
        applied: dict[str, Any],
    ) -> None:
        spec = self.spec
        snapshot = spec.ensemble.snapshot
        serve = spec.ensemble.serve if ema is not None else "raw"
        ends = cycle_ends(spec.epochs, spec.ensemble.members) if snapshot else []
        n_train = len(self.train_idx)
        n_batches = max(1, math.ceil(n_train / spec.batch_size))
        best = _Best(spec.monitor)
        epochs_run, start, last_val_loss = 0, 0, None
        if resume is not None:
            model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
            if scaler is not None and resume.scaler is not None:
                scaler.load_state_dict(resume.scaler)
            if ema is not None and resume.ema is not None:
                ema.module.load_state_dict(resume.ema)
            best.state, best.epoch, best.since, best.kind = (
                resume.best_state, resume.best_epoch, resume.since_best, resume.best_kind,
            )
            best.acc, best.loss, best.probs = resume.best_acc, resume.best_loss, resume.best_probs
            best.score = best.key(best.acc, best.loss)
            epochs_run = resume.epoch + 1
            start = spec.epochs if resume.member_done else resume.epoch + 1
            last_val_loss = next((r.val_loss for r in reversed(resume.history) if r.member == i), None)
            _set_rng_state(resume.rng, rng)
            self.log(f"member {i + 1}: resumed after epoch {resume.epoch + 1}/{spec.epochs} from a checkpoint")
        ema_steps = model_steps(ema.module) if ema is not None and steps is not None else None
        frozen_depth = freeze.frozen_groups
        for epoch in range(start, spec.epochs):
            self.check_stop()
            t0 = time.perf_counter()
            if fs.mode == "gradual":
                mode, stages = gradual_freeze(fs, epoch, n_groups)
                freeze = apply_freeze(model, mode=mode, stages=stages, train_bn=fs.train_bn)
                if freeze.frozen_groups != frozen_depth:
                    frozen_depth = freeze.frozen_groups
                    self.log(
                        f"member {i + 1} epoch {epoch + 1}: gradual unfreezing, frozen now: "
                        f"{', '.join(frozen_depth) or '-'} ({freeze.trainable_params:,} trainable)"
                    )
            scheduler.step(epoch, last_val_loss)
            lrs = [float(g["lr"]) for g in optimizer.param_groups]
            lr = lrs[head_group]
            set_train_mode(model, freeze)
            # Every leading step frozen right now runs without autograd (and, with frozen BN, in eval).
            no_grad_to = frozen_prefix(steps) if steps is not None else 0
            if steps is not None and not fs.train_bn:
                set_prefix_eval(steps, no_grad_to)
            view = epoch % len(cache.train) if cache is not None else 0
            loss_sum, correct = 0.0, 0
            # array_split keeps batch sizes within one of each other: no 1-image batch for BatchNorm.
            for rows in np.array_split(rng.permutation(n_train), n_batches):
                self.check_stop()
                y = self.train_labels[torch.from_numpy(rows).to(self.device)]
                target: torch.Tensor = y
                if cache is not None and steps is not None:
                    h = cache.train_batch(view, rows)
                    at = n_cache
                else:
                    h = self._input(self.train_idx[rows], pre, augment)
                    if mixer is not None:
                        h, target = mixer(h, y)
                    at = 0
                with self.autocast():
                    if steps is None:
                        logits = model(h)
                    else:
                        if no_grad_to > at:
                            with torch.no_grad():
                                h = forward_steps(steps, h, at, no_grad_to)
                            at = no_grad_to
                        logits = forward_steps(steps, h, at)
                loss = criterion(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if ema is not None:
                    ema.update(model)
                loss_sum += float(loss.detach()) * len(rows)
                correct += int((logits.detach().argmax(dim=1) == y).sum())
            train_loss = loss_sum / n_train
            if not math.isfinite(train_loss):
                raise TrainingError(
                    f"training diverged (loss {train_loss}) in epoch {epoch + 1} of member {i + 1} "
                    f"({backbone}); lower the learning rate (now {spec.optimizer.lr})"
                )
            train_seconds = time.perf_counter() - t0
            val_loss, val_acc, probs = self.evaluate(model, pre, steps, cache, n_cache)
            last_val_loss = val_loss
            epochs_run = epoch + 1
            record = EpochRecord(
                member=i,
                epoch=epoch,
                train_loss=train_loss,
                train_acc=correct / n_train,
                val_loss=val_loss,
                val_acc=val_acc,
                lr=lr,
                seconds=0.0,
                extra={
                    "train_images_per_s": n_train / max(train_seconds, 1e-9),
                    "lr_min": min(lrs),
                    "trainable_params": float(freeze.trainable_params),
                },
            )
            improved = False
            if serve in ("raw", "best"):
                improved |= best.offer(epoch, "raw", val_acc, val_loss, probs, model)
            if ema is not None:
                e_loss, e_acc, e_probs = self.evaluate(ema.module, pre, ema_steps, cache, n_cache)
                record.extra.update(ema_val_acc=e_acc, ema_val_loss=e_loss)
                if serve in ("ema", "best"):
                    improved |= best.offer(epoch, "ema", e_acc, e_loss, e_probs, ema.module)
            best.since = 0 if improved else best.since + 1
            record.extra["best"] = float(best.epoch == epoch)
            record.seconds = time.perf_counter() - t0
            if snapshot and epoch in ends:
                k = ends.index(epoch)
                # A snapshot is the weights at the end of its cycle (the EMA's when serve='ema').
                use_ema = ema is not None and serve == "ema"
                snap = _Best(spec.monitor, epoch=epoch, acc=val_acc, loss=val_loss, probs=probs)
                if use_ema:
                    snap.acc, snap.loss = record.extra["ema_val_acc"], record.extra["ema_val_loss"]
                    snap.probs = e_probs
                self.members.append(
                    self._member(
                        backbone, seed, _state_copy(ema.module if use_ema else model), pre, snap, epoch + 1,
                        freeze, head, "ema snapshot" if use_ema else "snapshot",
                    )
                )
                self.member_probs.append(snap.probs.copy())  # never shares memory with best.probs
                self.log(f"snapshot {k + 1}/{len(ends)} at the end of epoch {epoch + 1}: val acc {snap.acc:.3f}")
            self.log(
                f"member {i + 1} epoch {epoch + 1}/{spec.epochs}: lr {lr:.2e} "
                f"train loss {record.train_loss:.4f} acc {record.train_acc:.3f} | "
                f"val loss {val_loss:.4f} acc {val_acc:.3f}"
                + (f" | ema acc {record.extra['ema_val_acc']:.3f}" if ema is not None else "")
                + f" ({record.seconds:.1f}s)"
            )
            if self.on_epoch is not None:
                self.on_epoch(record)
            self.history.append(record)
            stop = not snapshot and spec.patience is not None and best.since >= spec.patience
            if self.checkpoint is not None:
                self.checkpoint(
                    TrainState(
                        member=i,
                        epoch=epoch,
                        member_done=stop or epoch == spec.epochs - 1,
                        fingerprint=self.fingerprint,
                        train_idx=self.train_idx,
                        val_idx=self.val_idx,
                        model=model.state_dict(),
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None,
                        best_state=best.state,
                        best_epoch=best.epoch,
                        best_acc=best.acc,
                        best_loss=best.loss,
                        best_probs=best.probs,
                        since_best=best.since,
                        rng=_rng_state(rng),
                        finished=list(self.members),
                        finished_probs=list(self.member_probs),
                        history=list(self.history),
                        ema=ema.module.state_dict() if ema is not None else None,
                        best_kind=best.kind,
                    )
                )
            if stop:
                self.log(f"member {i + 1}: no improvement in {spec.monitor} for {best.since} epochs, stopping early")
                break
        applied["epochs_run"] = epochs_run
        applied["best_epoch"] = best.epoch
        applied["served"] = best.kind
        if not snapshot:
            self.members.append(
                self._member(backbone, seed, best.state, pre, best, epochs_run, freeze, head, best.kind)
            )
            self.member_probs.append(best.probs)

    def _train_lbfgs(
        self, i: int, backbone: str, model: nn.Module, steps: list[Step] | None, cache: FeatureCache | None,
        pre: Preprocess, seed: int, freeze: FreezeReport, head: HeadConfig, applied: dict[str, Any],
    ) -> None:
        from .lbfgs import LbfgsProbe

        spec = self.spec
        if cache is None or steps is None:
            raise TrainingError(
                f"L-BFGS needs the backbone's features computed once, but the feature cache is off: "
                f"{applied['cache']['reason']}"
            )
        classifier = cast(Any, model).get_classifier()
        if not isinstance(classifier, nn.Linear) or applied["cache"]["prefix_steps"] != len(steps) - 1:
            raise TrainingError("L-BFGS fits a linear classifier on pooled features; this head is not one")
        feats = torch.cat([cache.train_batch(v, np.arange(len(self.train_idx))) for v in range(len(cache.train))])
        labels = self.train_labels.repeat(len(cache.train))
        probe = LbfgsProbe(
            feats,
            labels,
            self.num_classes,
            weight_decay=spec.optimizer.weight_decay,
            label_smoothing=spec.label_smoothing,
            init=(classifier.weight.detach().clone(), classifier.bias.detach().clone()),
        )
        best = _Best(spec.monitor)
        epochs_run = 0
        for epoch in range(spec.epochs):
            self.check_stop()
            t0 = time.perf_counter()
            train_loss = float(probe.step())
            with torch.no_grad():
                classifier.weight.copy_(probe.weight)
                classifier.bias.copy_(probe.bias)
                logits = torch.addmm(probe.bias, feats, probe.weight.t())
                train_acc = float((logits.argmax(1) == labels).float().mean())
            train_seconds = time.perf_counter() - t0
            val_loss, val_acc, probs = self.evaluate(model, pre, steps, cache, len(steps) - 1)
            epochs_run = epoch + 1
            improved = best.offer(epoch, "raw", val_acc, val_loss, probs, model)
            best.since = 0 if improved else best.since + 1
            record = EpochRecord(
                member=i, epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                val_acc=val_acc, lr=1.0, seconds=time.perf_counter() - t0,
                extra={
                    "train_images_per_s": len(self.train_idx) / max(train_seconds, 1e-9),
                    "grad_norm": float(probe.grad_norm),
                    "best": float(best.epoch == epoch),
                },
            )
            self.log(
                f"member {i + 1} L-BFGS step {epoch + 1}/{spec.epochs}: train loss {train_loss:.4f} "
                f"acc {train_acc:.3f} | val loss {val_loss:.4f} acc {val_acc:.3f} | "
                f"grad norm {record.extra['grad_norm']:.2e}"
            )
            if self.on_epoch is not None:
                self.on_epoch(record)
            self.history.append(record)
            if spec.patience is not None and best.since >= spec.patience:
                break
        applied["epochs_run"] = epochs_run
        applied["lbfgs"] = {"final_grad_norm": float(probe.grad_norm), "iterations": int(probe.iterations)}
        self.members.append(self._member(backbone, seed, best.state, pre, best, epochs_run, freeze, head, "raw"))
        self.member_probs.append(best.probs)


def train(
    data: ImageArray,
    spec: TrainSpec,
    *,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    num_threads: int | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    resume: TrainState | None = None,
    cache_memory_bytes: int = 2 * 1024**3,
    cache_disk_bytes: int = 0,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Fine-tune ``spec``'s ensemble on ``data``.

    Args:
        data: decoded images at the spec's image size (``preprocess_for(spec.backbone, spec.image_size)``).
        spec: the recipe.
        on_epoch: called with each member's ``EpochRecord`` after every epoch; ``member`` and ``epoch``
            are 0-based indices (display ``epoch + 1``).
        should_stop: polled between batches; returning True cancels training.
        device: ``cuda``, ``cpu``, ... ; ``None`` or ``auto`` picks a GPU when there is one. On CUDA
            the forward pass runs under autocast (bf16 where supported, else fp16 with a GradScaler).
        log: receives human-readable progress lines.
        num_threads: CPU threads for torch during training; default: torch's current setting, capped
            at the cores this process may use.
        checkpoint: called with the ``TrainState`` at the end of every epoch, after ``on_epoch``
            (``models.checkpoint.save_state`` writes it to disk). It must not keep the state's
            tensors: they belong to the live model and optimizer.
        resume: a ``TrainState`` to continue from (``models.checkpoint.load_state``): the run goes on
            after its epoch and, on the same device and thread count, ends exactly as an uninterrupted
            one. One that does not belong to ``data`` and ``spec`` (``resume_problem``) is logged and
            ignored: training starts from the beginning.
        cache_memory_bytes: the most the frozen-prefix feature cache may hold in memory.
        cache_disk_bytes: the most it may spill to ``cache_dir`` when memory is not enough.
        cache_dir: where it spills (nothing is left there afterwards).

    Returns:
        The ``TrainResult`` with every member's best-epoch weights and the ensemble's validation metrics.

    Raises:
        TrainingError: the data cannot be split or training diverged.
        TrainingCancelled: ``should_stop`` returned True.
        WeightsUnavailableError: the spec's weights cannot be obtained here.
    """
    start = time.perf_counter()
    check_trainable(data)
    shared = preprocess_for(spec.backbone, spec.image_size)
    if data.images.shape[1:3] != (shared.image_size, shared.image_size):
        raise ValueError(
            f"images are {data.images.shape[1]}x{data.images.shape[2]} px but the spec trains at "
            f"{shared.image_size} px: decode them with preprocess_for(spec.backbone, spec.image_size)"
        )
    dev = resolve_device(device)
    run = _Run(
        data, spec, dev, on_epoch, should_stop, log, checkpoint, resume,
        cache_memory_bytes=cache_memory_bytes, cache_disk_bytes=cache_disk_bytes, cache_dir=cache_dir,
    )
    run.check_stop()
    # Default: torch's own setting (a caller's set_num_threads wins), capped at the usable cores.
    threads = num_threads or min(torch.get_num_threads(), available_cpus())
    with num_threads(threads):
        run.log(
            f"training {spec.ensemble.members} member(s) on {dev} ({run.amp_dtype or 'fp32'}, {threads} threads), "
            f"{len(run.train_idx)} train / {len(run.val_idx)} val images, {len(data.classes)} classes, "
            f"{shared.image_size} px"
        )
        if spec.ensemble.snapshot:
            if len(run.members) < spec.ensemble.members:
                run.train_member(0, spec.backbone, shared, run.resume)
        else:
            for i, backbone in enumerate(spec.member_backbones()):
                if i < len(run.members):
                    continue
                state = run.resume if run.resume is not None and run.resume.member == i else None
                run.train_member(i, backbone, shared, state)

    y = data.labels[run.val_idx]
    all_members, all_probs = run.members, run.member_probs

    def acc_of(p: np.ndarray) -> float:
        return float((p.argmax(axis=1) == y).mean())

    all_acc = acc_of(np.mean(np.stack(all_probs), axis=0))
    chosen = list(range(len(all_members)))
    selection: dict[str, Any] | None = None
    if spec.ensemble.greedy and len(all_members) > 1:
        chosen, path = greedy_selection(all_probs, y)
        selection = {
            "chosen": chosen,
            "nll_path": path,
            "all_val_acc": all_acc,
            "note": "chosen on the validation split that also reports the metrics: optimistic",
        }
        run.log(f"greedy selection kept members {', '.join(str(c + 1) for c in chosen)} of {len(all_members)}")
    members = [all_members[c] for c in chosen]
    member_probs = [all_probs[c] for c in chosen]
    avg = np.mean(np.stack(member_probs), axis=0)
    val_acc = acc_of(avg)
    val_loss = float(-np.log(np.clip(avg[np.arange(len(y)), y], 1e-12, None)).mean())
    train_counts = np.bincount(data.labels[run.train_idx], minlength=len(data.classes))
    val_counts = np.bincount(y, minlength=len(data.classes))
    calibration = calibration_report(avg, y)
    comparison = _comparison(run.history, all_members, all_probs, y, all_acc, val_acc)
    applied: dict[str, Any] = {"members": run.applied}
    if selection is not None:
        applied["greedy"] = selection
    if spec.ensemble.snapshot:
        ends = cycle_ends(spec.epochs, spec.ensemble.members)
        applied["snapshot"] = {"cycles": spec.ensemble.members, "cycle_ends": ends}
    result = TrainResult(
        members=members,
        classes=list(data.classes),
        preprocess=Preprocess(
            members[0].preprocess.mean, members[0].preprocess.std, shared.interpolation, shared.image_size
        ),
        val_acc=val_acc,
        val_loss=val_loss,
        member_val_acc=[m.val_acc for m in members],
        history=run.history,
        seconds=time.perf_counter() - start,
        device=str(dev),
        amp=str(run.amp_dtype).removeprefix("torch.") if run.amp_dtype else None,
        train_size=len(run.train_idx),
        val_size=len(run.val_idx),
        split_counts={c: [int(train_counts[k]), int(val_counts[k])] for k, c in enumerate(data.classes)},
        evaluation=classification_report(avg, y, data.classes),
        calibration=calibration,
        temperature=float(calibration["temperature"]),
        applied=applied,
        comparison=comparison,
    )
    run.log(f"ensemble val acc {val_acc:.3f} (members {', '.join(f'{a:.3f}' for a in result.member_val_acc)})")
    before, after = calibration["before"], calibration["after"]
    run.log(
        f"temperature {result.temperature:.3f}: val ECE {before['ece']} -> {after['ece']}, "
        f"NLL {before['nll']} -> {after['nll']}"
    )
    return result


def _comparison(
    history: list[EpochRecord],
    members: list[TrainedMember],
    probs: list[np.ndarray],
    y: np.ndarray,
    all_acc: float,
    served_acc: float,
) -> dict[str, Any]:
    """Raw, EMA and ensemble validation accuracy side by side."""
    runs: dict[int, list[EpochRecord]] = {}
    for r in history:
        runs.setdefault(r.member, []).append(r)
    per_run = []
    for member, records in sorted(runs.items()):
        ema = [r.extra["ema_val_acc"] for r in records if "ema_val_acc" in r.extra]
        per_run.append(
            {
                "member": member,
                "raw_best_val_acc": max(r.val_acc for r in records),
                "raw_last_val_acc": records[-1].val_acc,
                "ema_best_val_acc": max(ema) if ema else None,
                "ema_last_val_acc": ema[-1] if ema else None,
            }
        )
    return {
        "runs": per_run,
        "members": [
            {"served": m.served, "val_acc": float((p.argmax(1) == y).mean())}
            for m, p in zip(members, probs, strict=True)
        ],
        "ensemble_all_val_acc": all_acc,
        "ensemble_val_acc": served_acc,
    }
