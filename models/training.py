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
from .freezing import FreezeReport, apply_freeze, set_train_mode
from .optim import create_optimizer, create_scheduler
from .spec import EpochRecord, TrainSpec
from .transforms import augment_batch, augment_transform, normalize_batch, normalize_transform
from .zoo import Preprocess, count_parameters, create_backbone, preprocess_for

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

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping ended this member's training."""
        return self.epochs_run < self.epochs_planned

    def build(self) -> nn.Module:
        """The member as an eval-mode CPU module with its trained weights."""
        model = create_backbone(
            self.backbone,
            weights="none",
            num_classes=self.num_classes,
            drop_rate=self.drop_rate,
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
            "curves": training_curves(self.history, [m.best_epoch for m in self.members]),
        }


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
    if len(state.finished) != state.member or len(state.finished_probs) != state.member:
        return f"it holds {len(state.finished)} finished members, expected {state.member}"
    if [m.backbone for m in state.finished] != backbones[: state.member]:
        return "its finished members have other backbones"
    train_idx, val_idx = stratified_split(data.labels, spec.val_fraction, spec.seed)
    if not (np.array_equal(state.train_idx, train_idx) and np.array_equal(state.val_idx, val_idx)):
        return "its train/validation split differs from this one"
    expected = sum(m.epochs_run for m in state.finished) + state.epoch + 1
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


def resolve_device(device: str | None) -> torch.device:
    """``None`` or ``auto``: the first CUDA GPU if there is one, else the CPU; otherwise as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    ) -> None:
        self.spec = spec
        self.device = device
        self.on_epoch = on_epoch
        self.should_stop = should_stop
        self.log = log or (lambda _msg: None)
        self.checkpoint = checkpoint
        self.num_classes = len(data.classes)
        self.history: list[EpochRecord] = []
        self.members: list[TrainedMember] = []
        self.member_probs: list[np.ndarray] = []
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

    def evaluate(self, model: nn.Module, pre: Preprocess) -> tuple[float, float, np.ndarray]:
        """Validation loss, accuracy and probabilities ``[V, C]``."""
        model.eval()
        probs, loss_sum = [], 0.0
        with torch.inference_mode():
            for start in range(0, len(self.val_idx), EVAL_BATCH):
                idx = torch.from_numpy(self.val_idx[start : start + EVAL_BATCH]).to(self.device)
                x = normalize_batch(self.images[idx], pre, self.device)
                if self.cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self.autocast():
                    logits = model(x).float()
                loss_sum += float(F.cross_entropy(logits, self.labels[idx], reduction="sum"))
                probs.append(logits.softmax(dim=-1).cpu())
        p = torch.cat(probs).numpy()
        y = self.labels[torch.from_numpy(self.val_idx).to(self.device)].cpu().numpy()
        return loss_sum / len(self.val_idx), float((p.argmax(1) == y).mean()), p

    def train_member(
        self, i: int, backbone: str, shared: Preprocess, resume: TrainState | None = None
    ) -> tuple[TrainedMember, np.ndarray]:
        spec = self.spec
        seed = spec.seed + i
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        pre = preprocess_for(backbone, shared.image_size)
        pre = Preprocess(pre.mean, pre.std, shared.interpolation, shared.image_size)

        model = create_backbone(
            backbone,
            # Resuming: every weight comes from the checkpoint, so nothing is loaded or downloaded.
            weights="none" if resume is not None else spec.weights,
            num_classes=self.num_classes,
            drop_rate=spec.head_dropout,
            image_size=shared.image_size,
        )
        freeze: FreezeReport = apply_freeze(
            model, mode=spec.freeze.mode, stages=spec.freeze.stages, train_bn=spec.freeze.train_bn
        )
        model.to(self.device)
        if self.cuda:
            model.to(memory_format=torch.channels_last)
        optimizer = create_optimizer(model, spec.optimizer)
        scheduler = create_scheduler(optimizer, spec.schedule, epochs=spec.epochs)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        augment = augment_transform(spec.augment, pre)
        normalize = normalize_transform(pre)
        trainable, total = count_parameters(model)
        self.log(
            f"member {i + 1}/{spec.ensemble.members}: {backbone} ({spec.weights} weights, seed {seed}), "
            f"{trainable:,}/{total:,} parameters trainable, frozen: {', '.join(freeze.frozen_groups) or '-'}"
        )

        n_batches = max(1, math.ceil(len(self.train_idx) / spec.batch_size))
        best: tuple[float, float] | None = None  # (val_acc, -val_loss), larger is better
        best_state: dict[str, torch.Tensor] = {}
        best_probs = np.empty((0, self.num_classes), dtype=np.float32)
        best_epoch, since_best, epochs_run = 0, 0, 0
        best_loss, best_acc = math.inf, 0.0
        start = 0
        if resume is not None:
            model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
            if scaler is not None and resume.scaler is not None:
                scaler.load_state_dict(resume.scaler)
            best_state, best_epoch, since_best = resume.best_state, resume.best_epoch, resume.since_best
            best_acc, best_loss, best_probs = resume.best_acc, resume.best_loss, resume.best_probs
            best = (best_acc, -best_loss)
            epochs_run = resume.epoch + 1
            start = spec.epochs if resume.member_done else resume.epoch + 1
            _set_rng_state(resume.rng, rng)
            self.log(f"member {i + 1}: resumed after epoch {resume.epoch + 1}/{spec.epochs} from a checkpoint")
        for epoch in range(start, spec.epochs):
            self.check_stop()
            t0 = time.perf_counter()
            scheduler.step(epoch)
            lr = float(optimizer.param_groups[0]["lr"])
            set_train_mode(model, freeze)
            loss_sum, correct = 0.0, 0
            # array_split keeps batch sizes within one of each other: no 1-image batch for BatchNorm.
            for batch in np.array_split(rng.permutation(self.train_idx), n_batches):
                self.check_stop()
                idx = torch.from_numpy(batch).to(self.device)
                x = normalize(augment_batch(self.images[idx].permute(0, 3, 1, 2), augment))
                if self.cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self.labels[idx]
                with self.autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                loss_sum += float(loss.detach()) * len(batch)
                correct += int((logits.detach().argmax(dim=1) == y).sum())
            train_loss = loss_sum / len(self.train_idx)
            if not math.isfinite(train_loss):
                raise TrainingError(
                    f"training diverged (loss {train_loss}) in epoch {epoch + 1} of member {i + 1} "
                    f"({backbone}); lower the learning rate (now {spec.optimizer.lr})"
                )
            train_seconds = time.perf_counter() - t0
            val_loss, val_acc, probs = self.evaluate(model, pre)
            epochs_run = epoch + 1
            record = EpochRecord(
                member=i,
                epoch=epoch,
                train_loss=train_loss,
                train_acc=correct / len(self.train_idx),
                val_loss=val_loss,
                val_acc=val_acc,
                lr=lr,
                seconds=time.perf_counter() - t0,
                extra={"train_images_per_s": len(self.train_idx) / max(train_seconds, 1e-9)},
            )
            score = (val_acc, -val_loss)
            if best is None or score > best:
                best, best_epoch, since_best = score, epoch, 0
                best_acc, best_loss, best_probs = val_acc, val_loss, probs
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                since_best += 1
            record.extra["best"] = float(best_epoch == epoch)
            self.log(
                f"member {i + 1} epoch {epoch + 1}/{spec.epochs}: lr {lr:.2e} "
                f"train loss {record.train_loss:.4f} acc {record.train_acc:.3f} | "
                f"val loss {val_loss:.4f} acc {val_acc:.3f} ({record.seconds:.1f}s)"
            )
            if self.on_epoch is not None:
                self.on_epoch(record)
            self.history.append(record)
            stop = spec.patience is not None and since_best >= spec.patience
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
                        best_state=best_state,
                        best_epoch=best_epoch,
                        best_acc=best_acc,
                        best_loss=best_loss,
                        best_probs=best_probs,
                        since_best=since_best,
                        rng=_rng_state(rng),
                        finished=list(self.members),
                        finished_probs=list(self.member_probs),
                        history=list(self.history),
                    )
                )
            if stop:
                self.log(f"member {i + 1}: no improvement for {since_best} epochs, stopping early")
                break

        member = TrainedMember(
            backbone=backbone,
            seed=seed,
            state_dict=best_state,
            num_classes=self.num_classes,
            drop_rate=spec.head_dropout,
            preprocess=pre,
            best_epoch=best_epoch,
            epochs_run=epochs_run,
            epochs_planned=spec.epochs,
            val_acc=best_acc,
            val_loss=best_loss,
            freeze=freeze.to_dict(),
        )
        return member, best_probs


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
    run = _Run(data, spec, dev, on_epoch, should_stop, log, checkpoint, resume)
    run.check_stop()
    members = run.members  # the finished ones of a resumed run, then each one trained here
    member_probs = run.member_probs
    # Default: torch's own setting (a caller's set_num_threads wins), capped at the usable cores.
    threads = num_threads or min(torch.get_num_threads(), available_cpus())
    with _num_threads(threads):
        run.log(
            f"training {spec.ensemble.members} member(s) on {dev} ({run.amp_dtype or 'fp32'}, {threads} threads), "
            f"{len(run.train_idx)} train / {len(run.val_idx)} val images, {len(data.classes)} classes, "
            f"{shared.image_size} px"
        )
        for i, backbone in enumerate(spec.member_backbones()):
            if i < len(members):
                continue
            state = run.resume if run.resume is not None and run.resume.member == i else None
            member, probs = run.train_member(i, backbone, shared, state)
            members.append(member)
            member_probs.append(probs)

    y = data.labels[run.val_idx]
    avg = np.mean(np.stack(member_probs), axis=0)
    val_acc = float((avg.argmax(axis=1) == y).mean())
    val_loss = float(-np.log(np.clip(avg[np.arange(len(y)), y], 1e-12, None)).mean())
    train_counts = np.bincount(data.labels[run.train_idx], minlength=len(data.classes))
    val_counts = np.bincount(y, minlength=len(data.classes))
    calibration = calibration_report(avg, y)
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
    )
    run.log(f"ensemble val acc {val_acc:.3f} (members {', '.join(f'{a:.3f}' for a in result.member_val_acc)})")
    before, after = calibration["before"], calibration["after"]
    run.log(
        f"temperature {result.temperature:.3f}: val ECE {before['ece']} -> {after['ece']}, "
        f"NLL {before['nll']} -> {after['nll']}"
    )
    return result
