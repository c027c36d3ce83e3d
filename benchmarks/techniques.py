"""Every technique of the job spec, measured on real images at one budget (issue #3, "Proof").

A baseline recipe (EfficientNet-Lite0 with its bundled ImageNet weights, Animal-MNIST silhouettes,
the first stages frozen so the frozen-prefix cache makes epochs cheap, Nesterov SGD with a cosine
schedule, one member, seed 0) and one run per technique that changes only the technique's job
fields, at the same number of epochs. Each trained model is scored on a held-out test split that
training never sees (``TrainResult.build_ensemble()`` on normalised test images), next to its
validation accuracy and wall time. The baseline is also trained with four more seeds, to show how
much accuracy moves when nothing but the seed (split and initialisation) changes.

A second set of runs draws the optimizer picture: SGD, momentum, Nesterov, AdaGrad, RMSProp, Adam
and L-BFGS fitting the same linear probe (a convex problem on cached features), their training loss
per epoch in ``docs/optimizers.png``.

Results go to ``docs/techniques.json`` and into the table of ``docs/techniques.md`` between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers. Rerun with
``python -m benchmarks.techniques``; ``--only NAME...`` reruns some rows (with their baseline) and
merges them into the stored results, ``--quick`` is a smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import math
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.bench_train import write_folder
from models.checkpoint import TrainState
from models.data import ImageArray, load_folder, stratified_split
from models.results import TrainResult
from models.runtime import available_cpus
from models.spec import TrainSpec
from models.training import TrainHooks, train
from models.transforms import normalize_batch
from models.zoo import preprocess_for
from service.sample_data import ANIMAL_CLASSES, animal_split, png_bytes

DOCS = Path(__file__).resolve().parent.parent / "docs"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SEED_ROWS = tuple(f"baseline seed {s}" for s in range(1, 5))


@dataclass(frozen=True)
class Budget:
    """What every run of one benchmark shares."""

    size: int = 64
    per_class: int = 50
    test_per_class: int = 50
    epochs: int = 8
    probe_epochs: int = 30
    fmp_size: int = 160


QUICK = Budget(size=48, per_class=12, test_per_class=5, epochs=3, probe_epochs=3, fmp_size=64)


def baseline(b: Budget) -> dict[str, Any]:
    """The baseline job: every technique row changes only its own fields of this."""
    return {
        "backbone": "tf_efficientnet_lite0",
        "weights": "bundled",
        "image_size": b.size,
        "epochs": b.epochs,
        "batch_size": 32,
        "val_fraction": 0.2,
        # stem + blocks.0-5 frozen (7 groups): blocks.6 + conv_head and the classifier train.
        "freeze": {"mode": "first_n", "stages": 7},
        "head_dropout": 0.0,
        "augment": {"preset": "none"},
        "optimizer": {"name": "nesterov", "lr": 0.01},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "patience": None,
        "seed": 0,
    }


@dataclass(frozen=True)
class Technique:
    """One row: the fields it changes from the baseline, and what it is."""

    name: str
    group: str
    change: dict[str, Any]
    what: str
    size: str = "size"  # the Budget field that gives the image size
    plot: bool = False  # a run of the optimizer picture
    versus: str | None = "baseline"  # the row it is compared with


def _probe(name: str, what: str, **optimizer: Any) -> Technique:
    change: dict[str, Any] = {
        "freeze": {"mode": "linear_probe"},
        "optimizer": {"name": name, **optimizer},
        "schedule": {"name": "constant", "warmup_epochs": 0},
        "epochs": "probe_epochs",
    }
    versus = None if name == "nesterov" else "probe nesterov"
    return Technique(f"probe {name}", "optimizer picture (linear probe)", change, what, plot=True, versus=versus)


def techniques(b: Budget) -> list[Technique]:
    """Every row, baseline first."""
    rows = [Technique("baseline", "baseline", {}, "the recipe every other row changes", versus=None)]
    rows += [Technique(n, "baseline", {"seed": s}, "the baseline, another seed (split and init)")
             for s, n in enumerate(SEED_ROWS, start=1)]
    opt = "optimizer"
    rows += [
        Technique("sgd", opt, {"optimizer": {"name": "sgd", "lr": 0.1}},
                  "plain SGD at lr 0.1 = the baseline's lr / (1 - momentum 0.9)"),
        Technique("sgd lr 0.01", opt, {"optimizer": {"name": "sgd"}}, "plain SGD at the baseline's lr"),
        Technique("momentum", opt, {"optimizer": {"name": "momentum"}}, "heavy-ball momentum 0.9"),
        Technique("adagrad", opt, {"optimizer": {"name": "adagrad"}}, "AdaGrad, lr 0.01"),
        Technique("rmsprop", opt, {"optimizer": {"name": "rmsprop", "lr": 0.001}}, "RMSProp, lr 1e-3"),
        Technique("adam", opt, {"optimizer": {"name": "adam", "lr": 0.001}}, "Adam, lr 1e-3"),
        Technique("adamw", opt, {"optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.05}},
                  "AdamW, lr 1e-3, decoupled weight decay 0.05"),
        Technique("lbfgs", opt, {"optimizer": {"name": "lbfgs"}, "freeze": {"mode": "linear_probe"}},
                  "L-BFGS, full batch: a linear probe only", versus="linear_probe"),
    ]
    sch = "schedule"
    rows += [
        Technique("constant", sch, {"schedule": {"name": "constant"}}, "no decay"),
        Technique("step", sch, {"schedule": {"name": "step", "step_epochs": 3}}, "x0.1 every 3 epochs"),
        Technique("multistep", sch, {"schedule": {"name": "multistep", "milestones": [3, 5]}},
                  "x0.1 after epochs 3 and 5 (of the post-warm-up ones)"),
        Technique("exponential", sch, {"schedule": {"name": "exponential", "gamma": 0.7}}, "x0.7 every epoch"),
        Technique("inverse_time", sch, {"schedule": {"name": "inverse_time", "decay": 0.5}}, "lr / (1 + 0.5 t)"),
        Technique("cosine_restarts", sch, {"schedule": {"name": "cosine_restarts", "cycle_epochs": 3}},
                  "cosine over 3 epochs, then restart"),
        Technique("one_cycle", sch, {"schedule": {"name": "one_cycle", "warmup_epochs": 0}},
                  "up from lr/25 over 30 % of the run, then cosine down (no separate warm-up)"),
        Technique("plateau", sch, {"schedule": {"name": "plateau", "plateau_patience": 1}},
                  "x0.1 after 2 epochs without a better val loss"),
    ]
    tr = "transfer"
    rows += [
        Technique("linear_probe", tr, {"freeze": {"mode": "linear_probe"}}, "only the new classifier trains"),
        Technique("full fine-tune", tr, {"freeze": {"mode": "none"}}, "every layer trains (no cache)"),
        Technique("gradual", tr, {"freeze": {"mode": "gradual", "stages": 7}},
                  "linear probe for one epoch, then blocks.6 + conv_head too (the baseline frozen depth)"),
        Technique("auto", tr, {"freeze": {"mode": "auto"}}, "picked from the images per class"),
        Technique("first_n 6 stages", tr, {"freeze": {"stages": 6}}, "blocks.5 (three residual blocks) trains too"),
        Technique("backbone_lr_mult 0.1", tr, {"freeze": {"backbone_lr_mult": 0.1}},
                  "fine-tuned stages at lr/10, the head at lr"),
        Technique("layer_decay 0.75", tr, {"freeze": {"layer_decay": 0.75}}, "each stage lower at 0.75 x the lr"),
        Technique("train_bn", tr, {"freeze": {"train_bn": True}},
                  "frozen stages' BatchNorm keeps batch statistics (no cache)"),
    ]
    reg = "regularization"
    rows += [
        Technique("head_dropout 0.5", reg, {"head_dropout": 0.5}, "dropout on the pooled features"),
        Technique("drop_connect 0.3", reg, {"drop_connect": 0.3}, "DropConnect on the classifier's weights"),
        Technique("drop_path 0.1", reg, {"drop_path": 0.1},
                  "stochastic depth in the trained blocks: blocks.6.0 has no residual branch to drop"),
        Technique("drop_path 0.1, 6 stages", reg, {"freeze": {"stages": 6}, "drop_path": 0.1},
                  "stochastic depth where it can act: blocks.5's residual blocks train", versus="first_n 6 stages"),
        Technique("label_smoothing 0.1", reg, {"label_smoothing": 0.1}, "soft targets"),
        Technique(f"baseline {b.fmp_size} px", reg, {"image_size": "fmp_size"},
                  "the baseline at the size where fractional max pooling is random", size="fmp_size"),
        Technique(f"fractional_max {b.fmp_size} px", reg, {"image_size": "fmp_size", "head_pool": "fractional_max"},
                  "fractional max pooling before the classifier", size="fmp_size", versus=f"baseline {b.fmp_size} px"),
    ]
    aug = "augmentation"
    rows += [
        Technique("augment light", aug, {"augment": {"preset": "light"}}, "random crop (scale 0.8-1) + flip"),
        Technique("augment standard", aug, {"augment": {"preset": "standard"}}, "crop 0.6-1, flip, colour jitter"),
        Technique("augment strong", aug, {"augment": {"preset": "strong"}},
                  "crop 0.35-1, flip, TrivialAugment, erasing, mixup/cutmix (no cache)"),
        Technique("mixup 0.2", aug, {"augment": {"preset": "none", "mixup_alpha": 0.2}}, "mixup only (no cache)"),
        Technique("cutmix 1.0", aug, {"augment": {"preset": "none", "cutmix_alpha": 1.0}}, "cutmix only (no cache)"),
        Technique("random_erasing 0.25", aug, {"augment": {"preset": "none", "random_erasing": 0.25}},
                  "erase a random rectangle (4 cached views)"),
    ]
    ens = "ensemble"
    rows += [
        Technique("members 3", ens, {"ensemble": {"members": 3}}, "3 runs (seeds 0-2), probabilities averaged"),
        Technique("snapshot 3", ens, {"ensemble": {"members": 3, "snapshot": True}},
                  "one run, cosine restarted 3 times, each cycle's end a member"),
        Technique("ema", ens, {"ensemble": {"ema": True, "ema_decay": 0.95, "serve": "ema"}},
                  "serve the exponential moving average of the weights (decay 0.95 per optimizer step)"),
        Technique("greedy of 3", ens, {"ensemble": {"members": 3, "greedy": True}},
                  "3 runs, greedy forward selection on validation"),
    ]
    rows += [
        Technique("early stopping", "early stopping", {"patience": 2, "monitor": "val_loss"},
                  "stop after 2 epochs without a better val loss, keep the best"),
    ]
    rows += [
        _probe("sgd", "plain SGD", lr=0.01),
        _probe("momentum", "heavy ball", lr=0.01),
        _probe("nesterov", "Nesterov momentum", lr=0.01),
        _probe("adagrad", "AdaGrad", lr=0.01),
        _probe("rmsprop", "RMSProp as in the lecture: no momentum", lr=0.01, momentum=0.0),
        _probe("adam", "Adam", lr=0.01),
        _probe("lbfgs", "L-BFGS (no lr: a line search picks each step)"),
    ]
    return rows


# --------------------------------------------------------------------------- running


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` applied, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve(change: dict[str, Any], b: Budget) -> dict[str, Any]:
    """A change with the budget's names (``"probe_epochs"``, ``"fmp_size"``) replaced by numbers."""
    return {k: getattr(b, v) if isinstance(v, str) and k in ("epochs", "image_size") else v
            for k, v in change.items()}


def job_of(t: Technique, b: Budget) -> dict[str, Any]:
    return merge(baseline(b), resolve(t.change, b))


def datasets(b: Budget, sizes: set[int], tmp: Path) -> dict[int, tuple[ImageArray, ImageArray]]:
    """(train, test) image arrays per size: PNG class folders decoded by ``load_folder`` like an upload."""
    train_root = write_folder(tmp / "train", b.per_class)  # the train part of animal_split(per_class, 1, seed=0)
    # The same seed draws the same train part whatever test_per_class is: the test images are disjoint from it.
    _, test = animal_split(per_class=b.per_class, test_per_class=b.test_per_class, seed=0)
    for cls, index, image in test:
        (tmp / "test" / cls).mkdir(parents=True, exist_ok=True)
        (tmp / "test" / cls / f"{index}.png").write_bytes(png_bytes(image))
    out = {}
    for size in sorted(sizes):
        interp = preprocess_for(baseline(b)["backbone"], size).interpolation
        out[size] = (load_folder(train_root, list(ANIMAL_CLASSES), size, interp),
                     load_folder(tmp / "test", list(ANIMAL_CLASSES), size, interp))
    return out


def test_correct(result: TrainResult, test: ImageArray) -> np.ndarray:
    """Per test image: whether the trained ensemble predicts its class."""
    model = result.build_ensemble()
    preds = []
    with torch.inference_mode():
        for s in range(0, len(test), 128):
            preds.append(model(normalize_batch(test.images[s : s + 128], result.preprocess)).argmax(1).numpy())
    return np.concatenate(preds) == test.labels


def probe_objective(
    result: TrainResult, data: ImageArray, spec: TrainSpec, heads: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[float]:
    """The linear probe's full-batch objective after each epoch: what L-BFGS minimises and reports.

    Mean cross-entropy over the whole training split plus ``weight_decay / 2 x ||W||^2`` (timm puts no
    decay on the bias, and neither does L-BFGS), from the classifier weights the ``checkpoint``
    callback kept. A mini-batch optimizer's own ``train_loss`` is the mean of its batch losses while
    the weights move, without the penalty: not the same number. For L-BFGS (no callback) the
    engine's ``train_loss`` is this objective already; the final weights are then checked against it.
    """
    model = result.members[0].build()  # a linear probe: the backbone is the pretrained one
    train_idx, _ = stratified_split(data.labels, spec.val_fraction, spec.seed)
    with torch.inference_mode():
        x = normalize_batch(data.images[train_idx], result.preprocess)
        feats = cast(Any, model).forward_head(cast(Any, model).forward_features(x), pre_logits=True)
        y = torch.from_numpy(data.labels[train_idx])
        wd = spec.optimizer.weight_decay

        def objective(w: torch.Tensor, b: torch.Tensor) -> float:
            return float(F.cross_entropy(feats @ w.t() + b, y) + wd / 2 * (w**2).sum())

        if heads:
            return [objective(w, b) for w, b in heads]
        member = result.members[0]  # its best epoch's weights
        kept = objective(member.state_dict["classifier.weight"], member.state_dict["classifier.bias"])
        losses = [r.train_loss for r in result.history]
        if abs(kept - losses[member.best_epoch]) > 1e-3 * kept + 1e-6:
            print(f"  ! L-BFGS reported {losses[member.best_epoch]:.6g}, its weights give {kept:.6g}", file=sys.stderr)
        return losses


@dataclass
class Row:
    """One run's outcome, as stored in ``docs/techniques.json``."""

    name: str
    group: str
    what: str
    change: dict[str, Any]
    versus: str | None
    size: int
    epochs: int
    plot: bool
    test_acc: float | None = None
    val_acc: float | None = None
    member_val_acc: list[float] = field(default_factory=list)
    seconds: float | None = None
    applied: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    train_loss: list[float] = field(default_factory=list)
    correct: str = ""  # per test image, in order: "1" predicted right, "0" wrong
    error: str | None = None


def run_one(t: Technique, b: Budget, data: ImageArray, test: ImageArray, verbose: bool) -> Row:
    job = job_of(t, b)
    row = Row(t.name, t.group, t.what, resolve(t.change, b), t.versus, job["image_size"], job["epochs"], t.plot)
    heads: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_head(state: TrainState) -> None:  # the state's tensors are live: copy
        heads.append((state.model["classifier.weight"].clone(), state.model["classifier.bias"].clone()))

    try:
        spec = TrainSpec.model_validate(job)
        t0 = time.perf_counter()
        hooks = TrainHooks(log=print if verbose else None, checkpoint=keep_head if t.plot else None)
        result = train(data, spec, device="cpu", hooks=hooks)
        row.seconds = time.perf_counter() - t0
        correct = test_correct(result, test)
        if t.plot:
            row.extra["objective"] = probe_objective(result, data, spec, heads)
    except Exception as e:  # an engine failure is a result too: the row keeps it
        row.error = f"{type(e).__name__}: {e}"
        print(f"  ! {t.name} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return row
    row.correct = "".join("1" if c else "0" for c in correct)
    row.test_acc = float(correct.mean())
    row.val_acc = result.val_acc
    row.member_val_acc = list(result.member_val_acc)
    row.applied = [
        {
            "transfer": a["transfer"]["mode"],
            "stages": a["transfer"]["stages"],
            "backbone_lr_mult": a["transfer"]["backbone_lr_mult"],
            "why": a["transfer"]["why"],
            "cache": a["cache"]["path"],
            "cache_reason": a["cache"]["reason"],
            "views": a["cache"]["views"],
            "schedule": a["schedule"],
            "served": a.get("served"),
            "epochs_run": a.get("epochs_run"),
            "lbfgs_iterations": a.get("lbfgs", {}).get("iterations"),
        }
        for a in result.applied["members"]
    ]
    if "greedy" in result.applied:
        row.extra["greedy_chosen"] = result.applied["greedy"]["chosen"]
        row.extra["all_members_val_acc"] = result.applied["greedy"]["all_val_acc"]
    # What the served model is built of: proof that a head option took effect.
    built = cast(Any, result.members[0].build())
    row.extra["pool"] = type(built.global_pool).__name__
    row.extra["classifier"] = type(built.get_classifier()).__name__
    if spec.ensemble.ema:
        row.extra["ema"] = result.comparison["runs"]
    first = min(r.member for r in result.history)
    row.train_loss = [r.train_loss for r in result.history if r.member == first]
    return row


# --------------------------------------------------------------------------- reporting


def paired_sd(a: str, b: str) -> float:
    """Standard deviation of the difference of two accuracies on the same test images (paired binomial)."""
    d = np.array([int(c) for c in a], dtype=float) - np.array([int(c) for c in b], dtype=float)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


def seed_sd(rows: dict[str, Row]) -> float | None:
    """Standard deviation of the baseline's test accuracy over its seeds."""
    accs = [a for n in ("baseline", *SEED_ROWS) if n in rows and (a := rows[n].test_acc) is not None]
    return float(np.std(accs, ddof=1)) if len(accs) >= 2 else None


def _field(change: dict[str, Any]) -> str:
    return "`" + json.dumps(change, separators=(", ", ": ")) + "`" if change else "-"


def _ran(r: Row) -> str:
    """What ``applied`` says ran: transfer mode when it is not the baseline's, cache path, and so on."""
    parts = []
    modes = sorted({a["transfer"] for a in r.applied})
    if modes != ["first_n"]:
        parts.append("/".join(modes))
    elif r.change.get("freeze", {}).get("mode") == "auto":
        a = r.applied[0]
        parts.append(f"first_n, {a['stages']} groups frozen, backbone at lr x {a['backbone_lr_mult']:g}")
    parts.append("cache " + "/".join(sorted({a["cache"] for a in r.applied})))
    views = sorted({a["views"] for a in r.applied if a["cache"] != "off"})
    if views and views != [1]:
        parts[-1] += f" ({'/'.join(map(str, views))} views)"
    plain = (None, "SelectAdaptivePool2d", "Linear")
    layers = [str(r.extra[k]) for k in ("pool", "classifier") if r.extra.get(k) not in plain]
    if layers:
        parts.append(", ".join(layers))
    stopped = [a["epochs_run"] for a in r.applied if a["epochs_run"] is not None and a["epochs_run"] < r.epochs]
    if stopped:
        parts.append(f"stopped after {stopped} epochs")
    served = sorted({a["served"] for a in r.applied if a["served"] not in (None, "raw")})
    if served:
        parts.append(f"served {'/'.join(served)}")
    if "greedy_chosen" in r.extra:
        parts.append(f"kept members {[c + 1 for c in r.extra['greedy_chosen']]} of 3")
    its = [a["lbfgs_iterations"] for a in r.applied if a.get("lbfgs_iterations") is not None]
    if its:
        parts.append(f"{its[0]} L-BFGS iterations")
    return "; ".join(parts)


def _versus(rows: dict[str, Row], r: Row, sd_seed: float) -> str:
    base = rows.get(r.versus) if r.versus else None
    if base is None or base.test_acc is None or r.test_acc is None:
        return "-"
    d = r.test_acc - base.test_acc
    sd = math.sqrt(paired_sd(r.correct, base.correct) ** 2 + 2 * sd_seed**2)
    mark = " *" if abs(d) > 2 * sd else ""
    return f"{100 * d:+.1f} ± {200 * sd:.1f}{mark}" + ("" if base.name == "baseline" else f" vs {base.name}")


HEAD = ["technique", "job field (change from the baseline)", "test acc", "val acc", "seconds", "vs (test, pp)", "ran"]


def table(rows: dict[str, Row], markdown: bool) -> str:
    """The results table (markdown for the doc, plain text for the terminal)."""
    sd_seed = seed_sd(rows) or 0.0
    lines = []
    group = None
    for r in rows.values():
        if r.group != group and markdown:
            lines.append([f"**{r.group}**"] + [""] * (len(HEAD) - 1))
            group = r.group
        if r.error is not None or r.test_acc is None:
            error = (r.error or "no result").replace("|", "/").replace("\n", " ")
            lines.append([r.name, _field(r.change), "error", "", "", "", error[:200]])
            continue
        lines.append([r.name, _field(r.change), f"{r.test_acc:.3f}", f"{r.val_acc:.3f}", f"{r.seconds:.1f}",
                      _versus(rows, r, sd_seed), _ran(r)])
    if markdown:
        out = ["| " + " | ".join(HEAD) + " |", "|" + "|".join("---" for _ in HEAD) + "|"]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    clip = 56
    lines = [[c if i != 1 or len(c) <= clip else c[: clip - 3] + "..." for i, c in enumerate(cells)] for cells in lines]
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(HEAD)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*cells).rstrip() for cells in [HEAD, *lines])


def optimizer_figure(rows: dict[str, Row]) -> bytes:
    """Training loss per epoch of each optimizer on the linear probe (log scale), as PNG bytes."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    styles: dict[str, dict[str, Any]] = {"lbfgs": {"color": "black", "linestyle": "--", "marker": "o", "markersize": 3}}
    for r in rows.values():
        if not r.plot or not r.train_loss:
            continue
        opt = r.name.removeprefix("probe ")
        label = {"sgd": "SGD", "momentum": "momentum", "nesterov": "Nesterov", "adagrad": "AdaGrad",
                 "rmsprop": "RMSProp", "adam": "Adam", "lbfgs": "L-BFGS"}.get(opt, opt)
        label += f" (test {r.test_acc:.2f})" if r.test_acc is not None else ""
        loss = r.extra.get("objective") or r.train_loss
        epochs = np.arange(1, len(loss) + 1)
        ax.plot(epochs, loss, label=label, linewidth=1.8, **styles.get(opt, {"marker": "."}))
    ax.set_yscale("log")
    ax.set_xlabel("epoch (L-BFGS: one outer step of up to 20 full-batch iterations)")
    ax.set_ylabel("training objective: full-batch cross-entropy + L2 term")
    lr = next((r.change["optimizer"]["lr"] for r in rows.values() if r.plot and r.name != "probe lbfgs"), None)
    ax.set_title(f"One linear probe (EfficientNet-Lite0 features, Animal-MNIST), seven optimizers\n"
                 f"first-order methods at lr {lr:g}, constant; batch 32", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def header(meta: dict[str, Any], rows: dict[str, Row]) -> str:
    b = meta["budget"]
    base = rows.get("baseline")
    n_test = max((len(r.correct) for r in rows.values()), default=0)
    p = base.test_acc if base is not None and base.test_acc is not None else math.nan
    sd_test = math.sqrt(p * (1 - p) / n_test) if n_test else math.nan
    sd_seed = seed_sd(rows)
    seeds = {s: rows[n].test_acc for s, n in enumerate(("baseline", *SEED_ROWS)) if n in rows and rows[n].test_acc}
    return "\n".join(
        [
            f"Run on {meta['date']} ({meta['machine']}; torch {meta['torch']}, torch threads: {meta['threads']}; "
            f"other jobs sharing the machine), {meta['total_seconds'] / 60:.1f} min in all.",
            f"Data: {b['per_class']} Animal-MNIST images per class (10 classes) for training and validation "
            f"(val fraction 0.2), {n_test} other images for the test; {b['size']} px, {b['epochs']} epochs "
            f"(linear-probe picture: {b['probe_epochs']}).",
            "",
            f"Noise: one test accuracy near {p:.2f} on {n_test} images has a binomial standard deviation of "
            f"{100 * sd_test:.1f} points; the baseline's test accuracy over seeds {', '.join(map(str, seeds))} is "
            f"{', '.join(f'{a:.3f}' for a in seeds.values())} (standard deviation "
            f"{100 * (sd_seed or math.nan):.1f} points). "
            "\"vs\" is the change in test accuracy, in points, against the baseline (or the row named) ± two "
            "standard deviations of that difference (the paired test-sampling noise and twice the seed variance "
            "added); `*` marks a change larger than that.",
        ]
    )


def write_docs(meta: dict[str, Any], rows: dict[str, Row]) -> None:
    DOCS.mkdir(exist_ok=True)
    payload = {"meta": meta, "rows": [r.__dict__ for r in rows.values()]}
    (DOCS / "techniques.json").write_text(json.dumps(payload, indent=1) + "\n")
    if any(r.plot and r.train_loss for r in rows.values()):
        (DOCS / "optimizers.png").write_bytes(optimizer_figure(rows))
    md = DOCS / "techniques.md"
    block = f"{START}\n{header(meta, rows)}\n\n{table(rows, markdown=True)}\n{END}"
    text = md.read_text() if md.exists() else f"# Techniques\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, text, count=1, flags=re.S)
    md.write_text(text)


def load_rows(meta: dict[str, Any]) -> dict[str, Row]:
    """Stored rows of an earlier run with the same budget (for ``--only``)."""
    path = DOCS / "techniques.json"
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    if stored["meta"]["budget"] != meta["budget"]:
        print("# the stored results used another budget: writing only the rows run now")
        return {}
    return {r["name"]: Row(**r) for r in stored["rows"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run; writes nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="rows (or groups) to run, e.g. adam schedule")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads can stall each other)")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    parser.add_argument("--verbose", action="store_true", help="print the training log")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    args = parser.parse_args()
    b = QUICK if args.quick else Budget()
    all_rows = techniques(b)
    if args.list:
        for t in all_rows:
            print(f"{t.group:32} {t.name:28} {json.dumps(resolve(t.change, b))}")
        return
    chosen = all_rows
    if args.only:
        names = {t.name for t in all_rows} | {t.group for t in all_rows}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"unknown rows {unknown}; valid: {', '.join(sorted(names))}")
        wanted = {t.name for t in all_rows if t.name in args.only or t.group in args.only}
        # Each row needs the row it is compared with (and that one its own).
        by_name = {t.name: t for t in all_rows}
        for name in list(wanted):
            versus = by_name[name].versus
            while versus:
                wanted.add(versus)
                versus = by_name[versus].versus
        chosen = [t for t in all_rows if t.name in wanted]
    torch.set_num_threads(args.threads)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {available_cpus()} CPU cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "budget": b.__dict__,
        "baseline": baseline(b),
    }
    t_start = time.perf_counter()
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {getattr(b, t.size) for t in chosen}
        data = datasets(b, sizes, Path(tmp))
        print(f"# {len(data[b.size][0])} train+val and {len(data[b.size][1])} test images, sizes {sorted(sizes)}, "
              f"{len(chosen)} runs, {torch.get_num_threads()} threads")
        for k, t in enumerate(chosen):
            size = getattr(b, t.size)
            row = run_one(t, b, *data[size], verbose=args.verbose)
            rows[t.name] = row
            status = row.error or f"test {row.test_acc:.3f} val {row.val_acc:.3f} {row.seconds:.1f}s"
            print(f"[{k + 1}/{len(chosen)}] {t.name}: {status} ({time.perf_counter() - t_start:.0f}s so far)",
                  flush=True)
    meta["total_seconds"] = time.perf_counter() - t_start
    if args.only and not args.quick:
        stored = load_rows(meta)
        if stored:
            meta["total_seconds"] = json.loads((DOCS / "techniques.json").read_text())["meta"]["total_seconds"]
            stored.update(rows)
            rows = {t.name: stored[t.name] for t in all_rows if t.name in stored}
    print()
    print(header(meta, rows))
    print()
    print(table(rows, markdown=False))
    if not (args.quick or args.no_write):
        write_docs(meta, rows)
        print(f"\nwrote {DOCS / 'techniques.json'}, {DOCS / 'techniques.md'}, {DOCS / 'optimizers.png'}")


if __name__ == "__main__":
    main()
