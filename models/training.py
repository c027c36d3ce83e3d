"""Fine-tune one or more backbones on a decoded image array.

``train`` is the whole job: seeded stratified split, then for each ensemble member a backbone
with its pretrained weights, the freeze policy, optimizer and schedule from the spec, epochs
with validation, best-epoch weights and early stopping; finally the ensemble (average of the
members' probabilities) is evaluated on the same validation split.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageArray, stratified_split
from .ensemble import Ensemble
from .errors import TrainingCancelled, TrainingError
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

    def build_ensemble(self) -> Ensemble:
        """The trained ensemble as an eval-mode CPU module (input normalised with ``preprocess``)."""
        return Ensemble(
            [m.build() for m in self.members],
            input_norm=(self.preprocess.mean, self.preprocess.std),
            member_norms=[(m.preprocess.mean, m.preprocess.std) for m in self.members],
        ).eval()

    def report(self) -> dict[str, Any]:
        """JSON-safe summary: ensemble and member metrics, parameters, split sizes, device."""
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
        }


def _num(x: float) -> float | None:
    # JSON has no inf/nan; a metric that is not finite is reported as null.
    return float(x) if math.isfinite(x) else None


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
    ) -> None:
        self.spec = spec
        self.device = device
        self.on_epoch = on_epoch
        self.should_stop = should_stop
        self.log = log or (lambda _msg: None)
        self.num_classes = len(data.classes)
        self.history: list[EpochRecord] = []
        self.train_idx, self.val_idx = stratified_split(data.labels, spec.val_fraction, spec.seed)
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

    def train_member(self, i: int, backbone: str, shared: Preprocess) -> tuple[TrainedMember, np.ndarray]:
        spec = self.spec
        seed = spec.seed + i
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        pre = preprocess_for(backbone, shared.image_size)
        pre = Preprocess(pre.mean, pre.std, shared.interpolation, shared.image_size)

        model = create_backbone(
            backbone,
            weights=spec.weights,
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
        for epoch in range(spec.epochs):
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
            if spec.patience is not None and since_best >= spec.patience:
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
    run = _Run(data, spec, dev, on_epoch, should_stop, log)
    run.check_stop()
    members: list[TrainedMember] = []
    member_probs: list[np.ndarray] = []
    # Default: torch's own setting (a caller's set_num_threads wins), capped at the usable cores.
    threads = num_threads or min(torch.get_num_threads(), available_cpus())
    with _num_threads(threads):
        run.log(
            f"training {spec.ensemble.members} member(s) on {dev} ({run.amp_dtype or 'fp32'}, {threads} threads), "
            f"{len(run.train_idx)} train / {len(run.val_idx)} val images, {len(data.classes)} classes, "
            f"{shared.image_size} px"
        )
        for i, backbone in enumerate(spec.member_backbones()):
            member, probs = run.train_member(i, backbone, shared)
            members.append(member)
            member_probs.append(probs)

    y = data.labels[run.val_idx]
    avg = np.mean(np.stack(member_probs), axis=0)
    val_acc = float((avg.argmax(axis=1) == y).mean())
    val_loss = float(-np.log(np.clip(avg[np.arange(len(y)), y], 1e-12, None)).mean())
    train_counts = np.bincount(data.labels[run.train_idx], minlength=len(data.classes))
    val_counts = np.bincount(y, minlength=len(data.classes))
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
    )
    run.log(f"ensemble val acc {val_acc:.3f} (members {', '.join(f'{a:.3f}' for a in result.member_val_acc)})")
    return result
