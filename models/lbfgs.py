"""A linear classifier fitted by L-BFGS, full batch, on cached features.

The objective is convex: mean softmax cross-entropy (optionally label-smoothed) of
``features @ weight.T + bias`` plus ``weight_decay / 2 x ||weight||^2`` (no penalty on the bias),
the objective whose stationary point SGD and Adam with coupled ``weight_decay`` seek.
``torch.optim.LBFGS`` with a strong-Wolfe line search minimises it; nothing is random, so a fit
is deterministic on a given device.

``LbfgsProbe`` is the fit one outer step at a time, for a training loop that reports an epoch per
step: each ``step()`` runs up to ``iters_per_step`` L-BFGS iterations and returns the objective after
them. There is no learning-rate schedule: the optimizer's lr is 1 (``LbfgsProbe.lr``), the scale
of the first trial step of each line search, which then picks the actual step length
(``last_step_size``). ``fit_linear_lbfgs`` runs steps until convergence; ``train_lbfgs_member``
is the ensemble member that the training loop runs when ``optimizer.name`` is ``lbfgs``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import TrainingError
from .member import Best, MemberSetup, RunContext, finished_member
from .spec import EpochRecord


@dataclass
class LbfgsFit:
    """A finished fit.

    Attributes:
        weight: ``[C, D]`` classifier weight (on the features' device).
        bias: ``[C]`` classifier bias.
        losses: the objective after each outer step.
        grad_norm: L2 norm of the objective's gradient (weight and bias) at the end.
        initial_grad_norm: the same at the starting point (for a relative criterion).
        iterations: L-BFGS iterations over all steps.
        evaluations: objective evaluations by L-BFGS (line searches included).
        converged: the last step stopped on a tolerance, not on an iteration or evaluation limit.
    """

    weight: Tensor
    bias: Tensor
    losses: list[float] = field(default_factory=list)
    grad_norm: float = float("nan")
    initial_grad_norm: float = float("nan")
    iterations: int = 0
    evaluations: int = 0
    converged: bool = False


@dataclass(frozen=True)
class LbfgsOptions:
    """How the solver runs (the objective itself is the weight decay and label smoothing).

    Attributes:
        iters_per_step: L-BFGS iterations per outer ``step()`` (``losses`` has one entry per step).
        max_iter: iterations in all, for ``fit_linear_lbfgs`` (a probe steps as often as it is asked).
        tolerance_grad: converged when the gradient's largest absolute entry is at most this.
        tolerance_change: converged when the loss or the step changes by less than this.
        history_size: L-BFGS memory (pairs of past steps and gradient changes).
        dtype: precision of the fit; default: the features' own when float32 or float64 (no copy),
            else float32. Other than the features' dtype, they are copied once. float32 reaches the
            optimum to float32 precision (a gradient norm around 1e-4 of the initial one, where the
            loss stops resolving changes); float64 gets orders of magnitude closer, at twice the memory.
    """

    iters_per_step: int = 20
    max_iter: int = 1000
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-12
    history_size: int = 20
    dtype: torch.dtype | None = None


class LbfgsProbe:
    """L-BFGS on a linear softmax classifier over fixed features, one outer step at a time.

    Args:
        features: ``[N, D]`` floating-point features; the fit runs on their device.
        labels: ``[N]`` class indices in ``[0, num_classes)``.
        num_classes: classifier outputs ``C``.
        weight_decay: L2 penalty ``weight_decay / 2 x ||W||^2`` on the weight (not the bias).
        label_smoothing: cross-entropy label smoothing.
        init: starting ``(weight, bias)``; zeros by default.
        options: the solver's iterations per step, tolerances, memory and precision.

    Raises:
        ValueError: shapes, label range, or non-floating features.
    """

    #: The optimizer's lr (see the module docstring); what a training loop records as the epoch's lr.
    lr = 1.0

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        num_classes: int,
        *,
        weight_decay: float,
        label_smoothing: float = 0.0,
        init: tuple[Tensor, Tensor] | None = None,
        options: LbfgsOptions | None = None,
    ) -> None:
        opts = options or LbfgsOptions()
        max_iter, dtype = opts.iters_per_step, opts.dtype
        if features.ndim != 2 or labels.ndim != 1 or len(labels) != len(features) or not len(labels):
            raise ValueError(
                f"need features [N, D] and labels [N] with N > 0, got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        if weight_decay < 0 or not 0 <= label_smoothing < 1 or max_iter < 1:
            raise ValueError("need weight_decay >= 0, 0 <= label_smoothing < 1 and iters_per_step >= 1")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got [{lo}, {hi}]")
        if dtype is None:
            dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
        features = features.to(dtype)
        self.features = features
        self.labels = labels.to(device=features.device, dtype=torch.long)
        self.weight_decay = float(weight_decay)
        self.label_smoothing = float(label_smoothing)
        self.max_iter = max_iter
        self.tolerance_grad = opts.tolerance_grad
        self.tolerance_change = opts.tolerance_change
        c, d = num_classes, features.shape[1]
        self.weight = features.new_zeros(c, d)
        self.bias = features.new_zeros(c)
        if init is not None:
            w0, b0 = init
            if tuple(w0.shape) != (c, d) or tuple(b0.shape) != (c,):
                raise ValueError(f"init must be weight [{c}, {d}] and bias [{c}]")
            self.weight.copy_(w0)
            self.bias.copy_(b0)
        self.weight.requires_grad_(True)
        self.bias.requires_grad_(True)
        self.optimizer = torch.optim.LBFGS(
            [self.weight, self.bias],
            lr=self.lr,
            max_iter=max_iter,
            tolerance_grad=opts.tolerance_grad,
            tolerance_change=opts.tolerance_change,
            history_size=opts.history_size,
            line_search_fn="strong_wolfe",
        )
        self.losses: list[float] = []
        self.converged = False
        loss, self.grad_norm, _ = self._evaluate()
        self.initial_loss = loss
        self.initial_grad_norm = self.grad_norm

    def objective(self) -> Tensor:
        """The objective at the current weights (a scalar with a graph to the weights)."""
        logits = torch.addmm(self.bias, self.features, self.weight.t())
        loss = F.cross_entropy(logits, self.labels, label_smoothing=self.label_smoothing)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * self.weight.pow(2).sum()
        return loss

    def _closure(self) -> Tensor:
        self.optimizer.zero_grad()
        loss = self.objective()
        loss.backward()
        return loss

    def _evaluate(self) -> tuple[float, float, float]:
        # Loss and gradient norms (L2, max) without touching .grad, which L-BFGS owns.
        with torch.enable_grad():
            loss = self.objective()
            gw, gb = torch.autograd.grad(loss, [self.weight, self.bias])
        flat = torch.cat([gw.flatten(), gb])
        return float(loss.detach()), float(flat.norm()), float(flat.abs().max())

    @property
    def iterations(self) -> int:
        """L-BFGS iterations so far."""
        return int(self._state().get("n_iter", 0))

    @property
    def evaluations(self) -> int:
        """Objective evaluations by L-BFGS so far (line searches included)."""
        return int(self._state().get("func_evals", 0))

    @property
    def last_step_size(self) -> float:
        """The step length the last line search accepted (0 before the first step)."""
        return float(self._state().get("t", 0.0))

    def _state(self) -> dict[str, Any]:
        return self.optimizer.state[self.weight]

    def step(self) -> float:
        """Run up to ``max_iter`` L-BFGS iterations; return the objective afterwards.

        ``converged`` then says whether it stopped on a tolerance; a loop should stop there (a
        further step may still move the weights a little, never to a higher objective).
        """
        group = self.optimizer.param_groups[0]
        iters, evals = self.iterations, self.evaluations
        self.optimizer.step(self._closure)
        loss, self.grad_norm, grad_max = self._evaluate()
        ran, used = self.iterations - iters, self.evaluations - evals
        # L-BFGS stops early only on a tolerance (gradient, loss change, step size).
        stopped_early = ran < group["max_iter"] and used < group["max_eval"]
        self.converged = grad_max <= self.tolerance_grad or stopped_early
        self.losses.append(loss)
        return loss

    def result(self) -> LbfgsFit:
        """The fit so far (weights detached and copied)."""
        return LbfgsFit(
            weight=self.weight.detach().clone(),
            bias=self.bias.detach().clone(),
            losses=list(self.losses),
            grad_norm=self.grad_norm,
            initial_grad_norm=self.initial_grad_norm,
            iterations=self.iterations,
            evaluations=self.evaluations,
            converged=self.converged,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (checkpoint/resume): weights, L-BFGS memory, history."""
        return {
            "weight": self.weight.detach().clone(),
            "bias": self.bias.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "losses": list(self.losses),
            "converged": self.converged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a probe built with the same arguments."""
        with torch.no_grad():
            self.weight.copy_(state["weight"])
            self.bias.copy_(state["bias"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.losses = list(state["losses"])
        self.converged = bool(state["converged"])
        _, self.grad_norm, _ = self._evaluate()


FIT_OPTIONS = LbfgsOptions(iters_per_step=50, max_iter=1000)


def fit_linear_lbfgs(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    weight_decay: float,
    label_smoothing: float = 0.0,
    init: tuple[Tensor, Tensor] | None = None,
    options: LbfgsOptions = FIT_OPTIONS,
    on_step: Callable[[LbfgsProbe], None] | None = None,
) -> LbfgsFit:
    """Fit a linear softmax classifier to ``features`` by L-BFGS until convergence.

    Runs ``LbfgsProbe.step()`` (``options.iters_per_step`` iterations each) until the probe converges
    or about ``options.max_iter`` iterations have run (the last step may go past it by less than
    ``iters_per_step``). With ``weight_decay=0`` and separable classes there is no minimum (the
    weights grow forever) and the fit ends on ``max_iter``.

    Args:
        features: ``[N, D]`` features; the fit runs on their device.
        labels: ``[N]`` class indices.
        num_classes: classifier outputs.
        weight_decay: L2 penalty ``weight_decay / 2 x ||W||^2`` on the weight.
        label_smoothing: cross-entropy label smoothing.
        init: starting ``(weight, bias)``; zeros by default.
        options: iterations in all (``max_iter``) and per outer step, tolerances, memory, precision;
            default ``FIT_OPTIONS`` (50 iterations per step, at most 1000).
        on_step: called with the probe after each outer step (progress; raise to cancel).

    Returns:
        The ``LbfgsFit``.
    """
    probe = LbfgsProbe(
        features,
        labels,
        num_classes,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        init=init,
        options=dataclasses.replace(options, iters_per_step=max(1, min(options.iters_per_step, options.max_iter))),
    )
    while probe.iterations < options.max_iter:
        before = probe.iterations
        probe.step()
        if on_step is not None:
            on_step(probe)
        if probe.converged or probe.iterations == before:
            break
    return probe.result()


def train_lbfgs_member(ctx: RunContext, m: MemberSetup) -> None:
    """Fit member ``m``'s linear classifier by L-BFGS on its cached features, one outer step an epoch.

    The member (its best step's weights) is appended to ``ctx.members``.

    Raises:
        TrainingError: the feature cache is off or the head is not a linear classifier.
    """
    spec = ctx.spec
    cache, steps = m.cache, m.steps
    if cache is None or steps is None:
        raise TrainingError(
            f"L-BFGS needs the backbone's features computed once, but the feature cache is off: "
            f"{m.applied['cache']['reason']}"
        )
    classifier = cast(Any, m.model).get_classifier()
    if not isinstance(classifier, nn.Linear) or m.applied["cache"]["prefix_steps"] != len(steps) - 1:
        raise TrainingError("L-BFGS fits a linear classifier on pooled features; this head is not one")
    n_train = len(ctx.train_idx)
    feats = torch.cat([cache.train_batch(v, np.arange(n_train)) for v in range(len(cache.train))])
    labels = ctx.train_labels.repeat(len(cache.train))
    probe = LbfgsProbe(
        feats,
        labels,
        ctx.num_classes,
        weight_decay=spec.optimizer.weight_decay,
        label_smoothing=spec.label_smoothing,
        init=(classifier.weight.detach().clone(), classifier.bias.detach().clone()),
    )
    best = Best(spec.monitor)
    epochs_run = 0
    for epoch in range(spec.epochs):
        ctx.check_stop()
        t0 = time.perf_counter()
        train_loss = float(probe.step())
        with torch.no_grad():
            classifier.weight.copy_(probe.weight)
            classifier.bias.copy_(probe.bias)
            logits = torch.addmm(probe.bias, feats, probe.weight.t())
            train_acc = float((logits.argmax(1) == labels).float().mean())
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, probs = ctx.evaluate(m.model, m.pre, steps, cache, len(steps) - 1)
        epochs_run = epoch + 1
        improved = best.offer(epoch, "raw", val_acc, val_loss, probs, m.model)
        best.since = 0 if improved else best.since + 1
        record = EpochRecord(
            member=m.index, epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
            val_acc=val_acc, lr=1.0, seconds=time.perf_counter() - t0,
            extra={
                "train_images_per_s": n_train / max(train_seconds, 1e-9),
                "grad_norm": float(probe.grad_norm),
                "best": float(best.epoch == epoch),
            },
        )
        ctx.log(
            f"member {m.index + 1} L-BFGS step {epoch + 1}/{spec.epochs}: train loss {train_loss:.4f} "
            f"acc {train_acc:.3f} | val loss {val_loss:.4f} acc {val_acc:.3f} | "
            f"grad norm {record.extra['grad_norm']:.2e}"
        )
        if ctx.on_epoch is not None:
            ctx.on_epoch(record)
        ctx.history.append(record)
        if spec.patience is not None and best.since >= spec.patience:
            break
    m.applied["epochs_run"] = epochs_run
    m.applied["lbfgs"] = {"final_grad_norm": float(probe.grad_norm), "iterations": int(probe.iterations)}
    ctx.members.append(finished_member(ctx, m, best.state, best, epochs_run, "raw"))
    ctx.member_probs.append(best.probs)
