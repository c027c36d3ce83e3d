"""The learning-rate range test (Smith, 2015; fastai's ``lr_find``): ``optimizer.lr: "auto"``.

Starting from the member's initial weights, a short run raises the learning rate exponentially
from ``start_lr`` to ``end_lr``, one mini-batch per step, and records the loss. The loss is
smoothed (an exponential moving average with bias correction, as fastai does) and the run stops
early once it diverges (the smoothed loss above ``DIVERGE_FACTOR`` times its minimum). Two
suggestions come from the curve:

* ``minimum / 10``: a tenth of the lr where the smoothed loss is lowest (the loss is still falling
  there, but not yet unstable), the pick;
* ``steepest``: where the smoothed loss falls fastest against log(lr), recorded for comparison.

The pick is capped at ``max_lr`` (``max_lr_for``: for a linear probe 0.1 for SGD-like optimizers,
0.01 for adaptive ones; once backbone layers train, 0.02 and 0.003): on a few hundred images the
training loss of a new head keeps falling up to absurd rates (it memorises), which the validation
loss would not thank, and a fine-tune at a linear probe's rate wrecks the pretrained features.

The test runs on the layers that will train, with the member's own optimizer type and parameter
groups (the backbone's groups keep their lr ratio to the head's); the weights and the optimizer
are put back afterwards, so the real run starts from the same point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

START_LR = 1e-6
END_LR = 10.0
NUM_ITER = 60
SMOOTH_BETA = 0.8
DIVERGE_FACTOR = 4.0
# Never pick outside these, whatever the curve says (the spec allows lr in (0, 10]).
PICK_BOUNDS = (1e-5, 0.5)
MAX_LR_SGD = 0.1
MAX_LR_ADAPTIVE = 0.01
# Once backbone layers train, the pretrained features must survive the first epochs: docs/techniques.md
# and the demo fine-tune the top stages with Nesterov at 0.02; 0.1 is for a new linear head alone.
MAX_LR_SGD_FINE_TUNE = 0.02
MAX_LR_ADAPTIVE_FINE_TUNE = 0.003


def max_lr_for(optimizer: str, *, fine_tune: bool) -> float:
    """The largest lr the range test may pick for ``optimizer``.

    Args:
        optimizer: ``OptimizerSpec.name``.
        fine_tune: backbone layers train too (anything but a linear probe).
    """
    if optimizer in ("sgd", "momentum", "nesterov"):
        return MAX_LR_SGD_FINE_TUNE if fine_tune else MAX_LR_SGD
    return MAX_LR_ADAPTIVE_FINE_TUNE if fine_tune else MAX_LR_ADAPTIVE


@dataclass
class LrFinderResult:
    """The range test's curve and what it picked (the report's ``lr_finder`` section)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    lr_min_div10: float
    lr_steepest: float
    lr: float
    method: str
    iterations: int
    seconds: float
    stopped: str
    start_lr: float = START_LR
    end_lr: float = END_LR
    group_ratios: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (rounded: the curve is for a figure)."""
        d = asdict(self)
        for key in ("lrs", "losses", "smoothed"):
            d[key] = [round(float(v), 6) if math.isfinite(v) else None for v in d[key]]
        return d


def _smooth(losses: list[float], beta: float = SMOOTH_BETA) -> list[float]:
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(
    lrs: list[float], smoothed: list[float], max_lr: float = PICK_BOUNDS[1]
) -> tuple[float, float, float, str]:
    """``(pick, minimum / 10, steepest, method)`` from a range test's curve (at least 3 points)."""
    lo, hi = PICK_BOUNDS[0], min(PICK_BOUNDS[1], max_lr)
    s = np.asarray(smoothed, dtype=np.float64)
    x = np.log(np.asarray(lrs, dtype=np.float64))
    finite = np.isfinite(s)
    if finite.sum() < 3:
        return lo, lo, lo, "too few finite losses: the smallest allowed lr"
    i_min = int(np.nanargmin(np.where(finite, s, np.inf)))
    min_div10 = float(lrs[i_min]) / 10
    grad = np.gradient(np.where(finite, s, np.nan), x)
    # The steepest fall before the minimum (after it the loss rises again).
    head = grad[: max(i_min, 2)]
    i_steep = int(np.nanargmin(head)) if np.isfinite(head).any() else 0
    steepest = float(lrs[i_steep])
    pick, method = min_div10, "minimum / 10 (a tenth of the lr with the lowest smoothed loss)"
    if pick > hi:
        method += f", capped at {hi:g}"
    return float(min(max(pick, lo), hi)), min_div10, steepest, method


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[np.ndarray], torch.Tensor],
    *,
    n_train: int,
    batch_size: int,
    rng: np.random.Generator,
    base_lr: float,
    num_iter: int = NUM_ITER,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    should_stop: Callable[[], None] | None = None,
    max_lr: float = PICK_BOUNDS[1],
) -> LrFinderResult:
    """Run the range test on ``model`` with ``optimizer``, then put both back as they were.

    Args:
        model: the model (frozen parts stay frozen: only what ``optimizer`` holds and requires grad trains).
        optimizer: the member's optimizer; its groups' lr ratios to ``base_lr`` are kept.
        step_loss: the training loss of a mini-batch of training rows (the caller runs the forward pass,
            e.g. from cached features).
        n_train: training images.
        batch_size: rows per step.
        rng: draws the mini-batches (a copy of the member's state is not needed: the test draws its own).
        base_lr: the lr the optimizer's groups were built for (their ratio to it is kept).
        num_iter: steps at most.
        start_lr: first lr.
        end_lr: last lr.
        should_stop: called between steps; raises to abandon the test (cancellation, deadline).
        max_lr: the largest lr it may pick.

    Returns:
        The curve and the pick.
    """
    import time

    t0 = time.perf_counter()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    ratios = [float(g["lr"]) / base_lr for g in optimizer.param_groups]
    lrs: list[float] = []
    losses: list[float] = []
    best = math.inf
    stopped = f"{num_iter} steps"
    try:
        batches = max(1, math.ceil(n_train / batch_size))
        order = np.array_split(rng.permutation(n_train), batches)
        for it in range(num_iter):
            if should_stop is not None:
                should_stop()
            lr = start_lr * (end_lr / start_lr) ** (it / max(num_iter - 1, 1))
            for g, r in zip(optimizer.param_groups, ratios, strict=True):
                g["lr"] = lr * r
            rows = order[it % batches]
            if it % batches == batches - 1:
                order = np.array_split(rng.permutation(n_train), batches)
            loss = step_loss(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            smooth = _smooth(losses)[-1]
            if not math.isfinite(smooth) or (it > 3 and smooth > DIVERGE_FACTOR * best):
                stopped = f"diverged at lr {lr:.2e} (smoothed loss {smooth:.3g} > {DIVERGE_FACTOR:g} x minimum)"
                break
            best = min(best, smooth)
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
        optimizer.zero_grad(set_to_none=True)
    smoothed = _smooth(losses)
    pick, min_div10, steepest, method = suggest(lrs, smoothed, max_lr) if len(lrs) >= 3 else (
        PICK_BOUNDS[0], PICK_BOUNDS[0], PICK_BOUNDS[0], "too few steps: the smallest allowed lr"
    )
    return LrFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        lr_min_div10=min_div10,
        lr_steepest=steepest,
        lr=pick,
        method=method,
        iterations=len(lrs),
        seconds=round(time.perf_counter() - t0, 3),
        stopped=stopped,
        start_lr=start_lr,
        end_lr=end_lr,
        group_ratios=ratios,
    )
