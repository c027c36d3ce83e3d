"""What a training run produces: the trained members, the ensemble and its evaluation report.

``TrainResult`` is what ``models.training.train`` returns and what ``models.artifact`` saves;
the serving path reads these types without importing the training loop. ``finish_ensemble``
turns the members a run trained into the ensemble: greedy selection, validation metrics,
calibration, and the side-by-side comparison of raw, EMA and ensemble accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .ensemble import Ensemble, greedy_selection
from .evaluation import (
    PROB_FLOOR,
    calibration_report,
    classification_report,
    negative_log_likelihood,
    scale_probs,
    training_curves,
)
from .heads import HeadConfig, create_classifier
from .report import MemberReport, Report
from .spec import EpochRecord
from .zoo import Preprocess

# The report keeps at most this many validation predictions (the highest losses): about 100 bytes
# each in the manifest and in every whole report the API answers.
VAL_PREDICTIONS_MAX = 2000


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

    def report(self) -> MemberReport:
        """This member's entry in the evaluation report."""
        return MemberReport(
            backbone=self.backbone,
            seed=self.seed,
            val_acc=self.val_acc,
            val_loss=self.val_loss,
            best_epoch=self.best_epoch,
            epochs_run=self.epochs_run,
            stopped_early=self.stopped_early,
            trainable_params=int(self.freeze["trainable_params"]),
            total_params=int(self.freeze["total_params"]),
            freeze_mode=self.freeze["mode"],
            frozen_groups=list(self.freeze["frozen_groups"]),
            head=dict(self.head),
            served=self.served,
        )

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
        val_predictions: per validation image, highest loss first (``val_predictions``), or None.
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
    val_predictions: list[dict[str, Any]] | None = None

    def build_ensemble(self) -> Ensemble:
        """The trained ensemble as an eval-mode CPU module (input normalised with ``preprocess``)."""
        return Ensemble(
            [m.build() for m in self.members],
            input_norm=(self.preprocess.mean, self.preprocess.std),
            member_norms=[(m.preprocess.mean, m.preprocess.std) for m in self.members],
        ).eval()

    def evaluation_report(self) -> Report:
        """The typed evaluation report stored with the model.

        Ensemble and member metrics, parameters, split sizes and device, plus ``evaluation``
        (per-class precision/recall/F1/support, confusion matrix, top-k accuracy on the validation
        split), ``calibration`` (ECE and NLL before/after temperature scaling, reliability bins),
        ``temperature`` and ``curves`` (per member and epoch: losses, accuracies, learning rate),
        ``applied``, ``comparison`` and any ``sections`` (``sweep``).
        """
        return Report.model_validate(
            {
                "val_acc": self.val_acc,
                "val_loss": self.val_loss,
                "member_val_acc": list(self.member_val_acc),
                "members": [m.report() for m in self.members],
                "classes": list(self.classes),
                "num_classes": len(self.classes),
                "train_size": self.train_size,
                "val_size": self.val_size,
                "split_counts": {k: list(v) for k, v in self.split_counts.items()},
                "image_size": self.preprocess.image_size,
                "device": self.device,
                "amp": self.amp,
                "seconds": round(self.seconds, 3),
                "epoch_seconds": round(sum(r.seconds for r in self.history), 3),
                "temperature": self.temperature,
                "evaluation": self.evaluation,
                "calibration": self.calibration,
                "curves": training_curves(self.history, _curve_best_epochs(self)),
                "applied": self.applied,
                "comparison": self.comparison,
                "val_predictions": self.val_predictions,
                **self.sections,
            }
        )

    def report(self) -> dict[str, Any]:
        """``evaluation_report()`` as JSON-safe data (no NaN or infinity)."""
        return self.evaluation_report().model_dump(mode="json")


def _curve_best_epochs(result: TrainResult) -> list[int]:
    # One entry per trained run (a snapshot ensemble is one run with several members).
    runs = sorted({r.member for r in result.history})
    best = {i: m.best_epoch for i, m in enumerate(result.members)}
    return [best.get(i, 0) for i in runs]


@dataclass
class RunOutcome:
    """What the training loop hands to ``finish_ensemble``: every member it trained, before selection.

    Attributes:
        classes: class names.
        labels: all labels of the dataset (``ImageArray.labels``).
        train_idx: training indices of the split.
        val_idx: validation indices of the split.
        members: the trained members, in order.
        member_probs: their validation probabilities ``[V, C]``.
        history: every epoch record, in order.
        applied: what each member's run did (``MemberApplied`` fields).
        preprocess: the shared preprocessing (image size, interpolation).
        device: where it ran.
        amp: mixed-precision dtype name, or None.
        started: ``time.perf_counter()`` when the run began.
        names: every image's ``<class>/<file>`` (``ImageArray.names``), or empty when unknown.
    """

    classes: list[str]
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    members: list[TrainedMember]
    member_probs: list[np.ndarray]
    history: list[EpochRecord]
    applied: list[dict[str, Any]]
    preprocess: Preprocess
    device: str
    amp: str | None
    started: float
    names: list[str] = field(default_factory=list)


def finish_ensemble(
    run: RunOutcome, *, greedy: bool, snapshot_ends: list[int] | None, log: Callable[[str], None]
) -> TrainResult:
    """The served ensemble of ``run``'s members with its validation metrics.

    Args:
        run: the members the loop trained.
        greedy: keep only the members that greedy forward selection picks (``ensemble.greedy``).
        snapshot_ends: the epochs a snapshot ensemble took its members at, or None.
        log: receives the summary lines.
    """
    y = run.labels[run.val_idx]
    all_members, all_probs = run.members, run.member_probs

    def acc_of(p: np.ndarray) -> float:
        return float((p.argmax(axis=1) == y).mean())

    all_acc = acc_of(np.mean(np.stack(all_probs), axis=0))
    chosen = list(range(len(all_members)))
    applied: dict[str, Any] = {"members": run.applied}
    if greedy and len(all_members) > 1:
        chosen, path = greedy_selection(all_probs, y)
        applied["greedy"] = {
            "chosen": chosen,
            "nll_path": path,
            "all_val_acc": all_acc,
            "note": "chosen on the validation split that also reports the metrics: optimistic",
        }
        log(f"greedy selection kept members {', '.join(str(c + 1) for c in chosen)} of {len(all_members)}")
    if snapshot_ends is not None:
        applied["snapshot"] = {"cycles": len(snapshot_ends), "cycle_ends": snapshot_ends}
    members = [all_members[c] for c in chosen]
    avg = np.mean(np.stack([all_probs[c] for c in chosen]), axis=0)
    val_acc = acc_of(avg)
    classes = list(run.classes)
    train_counts = np.bincount(run.labels[run.train_idx], minlength=len(classes))
    val_counts = np.bincount(y, minlength=len(classes))
    calibration = calibration_report(avg, y)
    shared = run.preprocess
    result = TrainResult(
        members=members,
        classes=classes,
        preprocess=Preprocess(
            members[0].preprocess.mean, members[0].preprocess.std, shared.interpolation, shared.image_size
        ),
        val_acc=val_acc,
        val_loss=negative_log_likelihood(avg, y),
        member_val_acc=[m.val_acc for m in members],
        history=run.history,
        seconds=time.perf_counter() - run.started,
        device=run.device,
        amp=run.amp,
        train_size=len(run.train_idx),
        val_size=len(run.val_idx),
        split_counts={c: [int(train_counts[k]), int(val_counts[k])] for k, c in enumerate(classes)},
        evaluation=classification_report(avg, y, classes),
        calibration=calibration,
        temperature=float(calibration["temperature"]),
        applied=applied,
        comparison=_comparison(run.history, all_members, all_probs, y, all_acc, val_acc),
        val_predictions=val_predictions(
            scale_probs(avg, float(calibration["temperature"])), y, classes, _val_names(run)
        ),
    )
    log(f"ensemble val acc {val_acc:.3f} (members {', '.join(f'{a:.3f}' for a in result.member_val_acc)})")
    before, after = calibration["before"], calibration["after"]
    log(
        f"temperature {result.temperature:.3f}: val ECE {before['ece']} -> {after['ece']}, "
        f"NLL {before['nll']} -> {after['nll']}"
    )
    return result


def _val_names(run: RunOutcome) -> list[str | None]:
    if len(run.names) != len(run.labels):
        return [None] * len(run.val_idx)
    return [run.names[i] for i in run.val_idx]


def val_predictions(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str | None], limit: int = VAL_PREDICTIONS_MAX
) -> list[dict[str, Any]]:
    """Each validation image's prediction, highest loss first, at most ``limit`` of them.

    Args:
        probs: the served probabilities ``[V, C]`` (temperature-scaled, as predict answers).
        labels: true labels ``[V]``.
        classes: class names.
        names: each image's file relative to the dataset root, or None.
        limit: most records kept (the highest losses).
    """
    p_true = probs[np.arange(len(labels)), labels]
    loss = -np.log(np.clip(p_true, PROB_FLOOR, None))
    predicted = probs.argmax(axis=1)
    order = np.argsort(-loss, kind="stable")[:limit]
    return [
        {
            "file": names[i],
            "label": classes[int(labels[i])],
            "predicted": classes[int(predicted[i])],
            "confidence": round(float(probs[i, predicted[i]]), 5),
            "loss": round(float(loss[i]), 5),
        }
        for i in order
    ]


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
