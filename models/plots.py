"""PNG figures of a model's evaluation report (``TrainResult.report()``).

``curves`` (loss, accuracy and learning rate per epoch and member), ``confusion`` (the
validation confusion matrix) and ``reliability`` (reliability diagrams before and after
temperature scaling) and ``lr_finder`` (the learning-rate range test). Figures are drawn
from the stored report alone, with matplotlib's
object API on the Agg canvas: no pyplot, so no global figure state and no backend switch,
and rendering is safe from the API's worker threads.

``cached_figure`` renders a figure once and keeps it in ``<model folder>/report/<name>.png``.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import ZooError
from .spec import check_name

FIGURES_DIR = "report"
DPI = 100


class ReportMissingError(ZooError):
    """A model saved without an evaluation report (or with an incomplete one)."""


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No timestamp/software metadata: the same report gives the same bytes.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _nan(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def curves_figure(report: dict[str, Any]) -> Figure:
    """Loss, accuracy and learning rate per epoch; one colour per member, train solid, val dashed."""
    curves = report.get("curves")
    if not curves:
        raise ReportMissingError("the report has no training curves")
    members = report.get("members", [])
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for c, color in zip(curves, colors, strict=True):
        m = c["member"]
        name = f"member {m + 1}"
        if m < len(members) and members[m].get("backbone"):
            name += f" ({members[m]['backbone']})"
        x = np.asarray(c["epoch"]) + 1
        ax_loss.plot(x, _nan(c["train_loss"]), color=color, marker=".", label=f"{name} train")
        ax_loss.plot(x, _nan(c["val_loss"]), color=color, marker=".", linestyle="--", label=f"{name} val")
        ax_acc.plot(x, _nan(c["train_acc"]), color=color, marker=".", label=f"{name} train")
        ax_acc.plot(x, _nan(c["val_acc"]), color=color, marker=".", linestyle="--", label=f"{name} val")
        ax_lr.plot(x, _nan(c["lr"]), color=color, marker=".", label=name)
        best = c.get("best_epoch")
        if best is not None and best in c["epoch"]:
            i = c["epoch"].index(best)
            for ax, key in ((ax_loss, "val_loss"), (ax_acc, "val_acc")):
                if c[key][i] is not None:
                    ax.plot([best + 1], [c[key][i]], marker="*", markersize=14, color=color, linestyle="none")
    ax_loss.set(title="loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="accuracy (* kept epoch)", xlabel="epoch", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    lrs = np.concatenate([_nan(c["lr"]) for c in curves])
    if np.nanmin(lrs) > 0 and np.nanmax(lrs) / np.nanmin(lrs) > 50:
        ax_lr.set_yscale("log")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"training curves: ensemble val acc {report.get('val_acc', float('nan')):.3f}")
    return fig


def confusion_figure(report: dict[str, Any]) -> Figure:
    """Validation confusion matrix: colour = share of the true class (row), text = image count."""
    ev = report.get("evaluation") or {}
    if "confusion" not in ev:
        raise ReportMissingError("the report has no confusion matrix")
    cm = np.asarray(ev["confusion"], dtype=np.int64)
    classes = [pc["label"] for pc in ev.get("per_class", [])] or report.get("classes") or [
        str(i) for i in range(len(cm))
    ]
    n = len(cm)
    side = min(max(5.0, 0.55 * n + 3.0), 30.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize="small",
                        color="white" if share[i, j] > 0.5 else ("black" if cm[i, j] else "0.6"))
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true")
    acc = ev.get("accuracy")
    ax.set_title(f"confusion matrix, {int(cm.sum())} validation images"
                 + (f", accuracy {acc:.3f}" if acc is not None else ""))
    return fig


def _reliability_axes(ax: Axes, hist: Axes, part: dict[str, Any], title: str) -> None:
    bins = part["reliability"]
    lo = np.array([b["lower"] for b in bins])
    hi = np.array([b["upper"] for b in bins])
    width = hi - lo
    acc = _nan([b["accuracy"] for b in bins])
    conf = _nan([b["confidence"] for b in bins])
    count = np.array([b["count"] for b in bins])
    filled = count > 0
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.bar(lo[filled], acc[filled], width=width[filled], align="edge", color="C0", edgecolor="black",
           label="accuracy")
    # The gap between each bin's accuracy and its mean confidence, as in Guo et al. (2017): above
    # the bar an over-confident bin, inside it an under-confident one.
    ax.bar(lo[filled], np.abs(conf[filled] - acc[filled]), bottom=np.minimum(acc[filled], conf[filled]),
           width=width[filled], align="edge", facecolor="none", edgecolor="C3", hatch="//", linewidth=1.2,
           label="gap to mean confidence")
    ax.plot((lo + hi)[filled] / 2, conf[filled], linestyle="none", marker="_", markersize=12, color="C3",
            markeredgewidth=2)
    ece, nll = part.get("ece"), part.get("nll")
    ax.text(0.03, 0.97, f"ECE {ece:.4f}\nNLL {nll:.4f}" if ece is not None and nll is not None else "",
            transform=ax.transAxes, va="top", fontsize="medium",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.set(title=title, ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    hist.bar(lo, count, width=width, align="edge", color="C7", edgecolor="black")
    hist.set(xlabel="confidence (largest probability)", ylabel="images", xlim=(0, 1))


def reliability_figure(report: dict[str, Any]) -> Figure:
    """Reliability diagrams before and after temperature scaling, with the confidence histograms."""
    cal = report.get("calibration") or {}
    if "before" not in cal or "after" not in cal:
        raise ReportMissingError("the report has no calibration")
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, height_ratios=[3, 1], sharex="col")
    _reliability_axes(axes[0, 0], axes[1, 0], cal["before"], "before temperature scaling")
    _reliability_axes(axes[0, 1], axes[1, 1], cal["after"], f"after (T = {cal['temperature']:.3f})")
    fig.suptitle(f"reliability on the validation split ({cal.get('bins', len(cal['before']['reliability']))} bins)")
    return fig


def lr_finder_figure(report: dict[str, Any]) -> Figure:
    """The learning-rate range test: loss (raw and smoothed) against lr, with the picks marked."""
    lf = report.get("lr_finder")
    if not lf or not lf.get("lrs"):
        raise ReportMissingError("the report has no learning-rate finder (the job's lr was not 'auto')")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    lrs = _nan(lf["lrs"])
    ax.plot(lrs, _nan(lf["losses"]), color="C0", alpha=0.35, label="loss")
    ax.plot(lrs, _nan(lf["smoothed"]), color="C0", label="smoothed")
    for value, style, name in (
        (lf.get("lr_min_div10"), ":", "minimum / 10"),
        (lf.get("lr_steepest"), "--", "steepest"),
        (lf.get("lr"), "-", "picked"),
    ):
        if value:
            ax.axvline(value, color="C3" if name == "picked" else "C7", linestyle=style, label=f"{name} {value:.2g}")
    ax.set_xscale("log")
    ax.set(title=f"learning-rate range test ({lf.get('iterations', len(lrs))} steps)", xlabel="lr", ylabel="loss")
    ax.ticklabel_format(axis="y", useOffset=False)  # a small fall in loss reads as losses, not "+1.097"
    ax.legend(fontsize="small")
    return fig


FIGURES: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "curves": curves_figure,
    "confusion": confusion_figure,
    "reliability": reliability_figure,
    "lr_finder": lr_finder_figure,
}


def render_figure(name: str, report: dict[str, Any]) -> bytes:
    """The PNG bytes of figure ``name`` (one of ``FIGURES``) drawn from ``report``.

    Raises:
        UnknownNameError: ``name`` is not in ``FIGURES``.
        ReportMissingError: the report lacks what the figure needs.
    """
    return _png(FIGURES[check_name("figure", name, list(FIGURES))](report))


def cached_figure(model_dir: Path, name: str, report: dict[str, Any]) -> bytes:
    """``render_figure``, kept in ``<model_dir>/report/<name>.png`` after the first call.

    The file is written under a temporary name and renamed, so concurrent first requests each
    see a whole PNG. When the folder cannot be written (a read-only model store) the figure is
    served without being kept. Replacing the model folder (a re-saved model) drops the cache.
    """
    check_name("figure", name, list(FIGURES))
    path = Path(model_dir) / FIGURES_DIR / f"{name}.png"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    png = render_figure(name, report)
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(png)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass
    return png
