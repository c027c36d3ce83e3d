"""The evaluation report: classification metrics, calibration and temperature scaling.

Everything works on the ensemble's averaged class probabilities ``p [N, C]`` and the true
labels ``y [N]`` of the held-out validation split, with plain numpy (no scikit-learn):
the confusion matrix, per-class precision/recall/F1/support, top-k accuracy, the negative
log-likelihood and the expected calibration error (ECE) over equal-width confidence bins
(Guo et al., 2017, "On Calibration of Modern Neural Networks").

Temperature scaling fits one scalar ``T`` on the validation split by minimizing the NLL of
``softmax(log p / T)``, i.e. ``p_T ∝ p ** (1 / T)``: ``T > 1`` softens an over-confident
model, ``T < 1`` sharpens an under-confident one (averaging members tends to do that). The
argmax, hence accuracy, never changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .report import finite_or_none
from .spec import EpochRecord

N_BINS = 15
TOP_K = (1, 3, 5)
# Probabilities are floored before taking logs (float32 softmax underflows to 0); the same
# floor is used for the validation loss, the fit and at prediction time.
PROB_FLOOR = 1e-12
# The fitted temperature is clamped to this range. A validation split that the ensemble
# classifies perfectly has its NLL minimum at T -> 0 (one-hot outputs); the lower bound keeps
# such a (usually small) split from making every later prediction certain.
TEMPERATURE_BOUNDS = (0.25, 20.0)


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"expected probs [N, C] and labels [N], got {p.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]})")
    return p, y


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    y = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(preds, dtype=np.int64)
    if y.shape != pred.shape:
        raise ValueError(f"labels {y.shape} and predictions {pred.shape} differ in shape")
    for name, a in (("labels", y), ("predictions", pred)):
        if len(a) and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    return np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # 0 where the denominator is 0 (no predictions of / no images of that class), like
    # scikit-learn's zero_division=0, without its warning.
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of every class from a confusion matrix.

    Args:
        confusion: ``[C, C]`` counts, rows = true class (as ``confusion_matrix`` returns).

    Returns:
        ``{"precision", "recall", "f1"}`` float arrays ``[C]`` (0 where undefined) and
        ``"support"`` (true images per class) as an int array.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    precision = _ratio(tp, cm.sum(axis=0).astype(np.float64))
    recall = _ratio(tp, support.astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` most probable (``k`` capped at C).

    Ties are broken by class index (a stable sort), so the result is deterministic.
    """
    p, y = _check(probs, labels)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not len(y):
        return math.nan
    top = np.argsort(-p, axis=1, kind="stable")[:, : min(k, p.shape[1])]
    return float((top == y[:, None]).any(axis=1).mean())


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``-log p[y]`` (probabilities floored at ``PROB_FLOOR``)."""
    p, y = _check(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], PROB_FLOOR, None)).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Confidence histogram for a reliability diagram.

    The confidence of a row is its largest probability; bin ``b`` holds confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (the first bin also holds 0).

    Returns:
        ``edges [n_bins + 1]``, and per bin ``count``, mean ``confidence`` and ``accuracy``
        (NaN for an empty bin).
    """
    p, y = _check(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # side="left" puts a confidence equal to an edge into the bin below it: bins are (lo, hi].
    idx = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": edges,
            "count": count,
            "confidence": np.where(count > 0, conf_sum / count, np.nan),
            "accuracy": np.where(count > 0, acc_sum / count, np.nan),
        }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` over equal-width bins."""
    r = reliability(probs, labels, n_bins)
    n = int(r["count"].sum())
    if n == 0:
        return math.nan
    filled = r["count"] > 0
    gaps = np.abs(r["accuracy"][filled] - r["confidence"][filled])
    return float((r["count"][filled] / n * gaps).sum())


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> float:
    """The temperature ``T`` minimizing the NLL of ``softmax(log_probs / T)``.

    LBFGS (strong-Wolfe line search) on ``log T``, in float64. The NLL is convex in ``1 / T``,
    so clamping the optimum to ``TEMPERATURE_BOUNDS`` gives the best temperature in that range.

    Args:
        log_probs: ``[N, C]`` log-probabilities (or logits) of the validation split.
        labels: ``[N]`` true classes.
        max_iter: LBFGS iterations.

    Returns:
        ``T`` in ``TEMPERATURE_BOUNDS``; 1.0 for an empty split or a failed fit.
    """
    z_np, y_np = _check(log_probs, labels)
    if not len(y_np):
        return 1.0
    z = torch.from_numpy(z_np)
    y = torch.from_numpy(y_np)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    lo, hi = TEMPERATURE_BOUNDS
    return min(max(t, lo), hi)


def scale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise (``p`` floored at ``PROB_FLOOR``); ``T == 1`` returns ``p``."""
    p = np.asarray(probs)
    if temperature == 1.0:
        return p
    z = np.log(np.clip(p.astype(np.float64), PROB_FLOOR, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(p.dtype, copy=False)


def scale_probs_torch(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``scale_probs`` on a tensor (what ``Predictor`` applies to the averaged ensemble)."""
    if temperature == 1.0:
        return probs
    return (probs.clamp_min(PROB_FLOOR).log() / temperature).softmax(dim=-1)


def classification_report(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], top_k: Sequence[int] = TOP_K
) -> dict[str, Any]:
    """Confusion matrix, per-class and averaged precision/recall/F1, top-k accuracy (JSON-safe).

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` true classes.
        classes: the ``C`` class names.
        top_k: which ``k`` to report; ``k >= C`` is left out (it is always 1), except ``k = 1``.

    Returns:
        ``{"size", "accuracy", "top_k_acc": {"1": ..}, "per_class": [{"label", "precision",
        "recall", "f1", "support"}], "macro_avg", "weighted_avg", "confusion": [[..]]}``.
    """
    p, y = _check(probs, labels)
    if p.shape[1] != len(classes):
        raise ValueError(f"{p.shape[1]} probability columns but {len(classes)} classes")
    cm = confusion_matrix(y, p.argmax(axis=1), len(classes))
    m = per_class_metrics(cm)
    support = m["support"]
    weights = support / support.sum() if support.sum() else np.zeros(len(classes))
    return {
        "size": len(y),
        "accuracy": finite_or_none(top_k_accuracy(p, y, 1)),
        "top_k_acc": {
            str(k): finite_or_none(top_k_accuracy(p, y, k)) for k in sorted(set(top_k)) if k == 1 or k < len(classes)
        },
        "per_class": [
            {
                "label": c,
                "precision": float(m["precision"][i]),
                "recall": float(m["recall"][i]),
                "f1": float(m["f1"][i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        ],
        "macro_avg": {k: float(m[k].mean()) for k in ("precision", "recall", "f1")},
        "weighted_avg": {k: float((m[k] * weights).sum()) for k in ("precision", "recall", "f1")},
        "confusion": cm.tolist(),
    }


def _calibration_of(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, Any]:
    r = reliability(probs, labels, n_bins)
    edges = r["edges"]
    return {
        "ece": finite_or_none(expected_calibration_error(probs, labels, n_bins)),
        "nll": finite_or_none(negative_log_likelihood(probs, labels)),
        "reliability": [
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": int(r["count"][b]),
                "confidence": finite_or_none(float(r["confidence"][b])),
                "accuracy": finite_or_none(float(r["accuracy"][b])),
            }
            for b in range(n_bins)
        ],
    }


def calibration_report(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """Fit the temperature on ``(probs, labels)`` and report calibration before and after.

    Returns:
        ``{"bins", "temperature", "temperature_bounds", "before": {"ece", "nll", "reliability"},
        "after": {...}}``; ``reliability`` lists each bin's ``lower``, ``upper``, ``count``,
        mean ``confidence`` and ``accuracy`` (null when empty).
    """
    p, y = _check(probs, labels)
    t = fit_temperature(np.log(np.clip(p, PROB_FLOOR, None)), y)
    return {
        "bins": n_bins,
        "temperature": t,
        "temperature_bounds": list(TEMPERATURE_BOUNDS),
        "before": _calibration_of(p, y, n_bins),
        "after": _calibration_of(scale_probs(p, t), y, n_bins),
    }


def training_curves(history: Sequence[EpochRecord], best_epochs: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Per member, its epochs' losses, accuracies and learning rates, in epoch order.

    Args:
        history: every member's ``EpochRecord``s (``TrainResult.history``).
        best_epochs: each member's kept epoch (``TrainedMember.best_epoch``), by member index.

    Returns:
        ``[{"member", "best_epoch", "epoch": [...], "train_loss": [...], "val_loss", "train_acc",
        "val_acc", "lr"}]`` with 0-based epochs (as in the history), one entry per member.
    """
    by_member: dict[int, dict[int, EpochRecord]] = {}
    for r in history:
        by_member.setdefault(r.member, {})[r.epoch] = r  # a repeated epoch (resumed run): the last one wins
    curves = []
    for member in sorted(by_member):
        records = [by_member[member][e] for e in sorted(by_member[member])]
        curves.append(
            {
                "member": member,
                "best_epoch": best_epochs[member] if member < len(best_epochs) else None,
                "epoch": [r.epoch for r in records],
                "train_loss": [finite_or_none(r.train_loss) for r in records],
                "val_loss": [finite_or_none(r.val_loss) for r in records],
                "train_acc": [finite_or_none(r.train_acc) for r in records],
                "val_acc": [finite_or_none(r.val_acc) for r in records],
                "lr": [finite_or_none(r.lr) for r in records],
            }
        )
    return curves
