"""L-BFGS linear probe: reaches the optimum of its convex objective, deterministically, a step at a time."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models.lbfgs import FIT_OPTIONS, LbfgsOptions, LbfgsProbe, fit_linear_lbfgs

C = 5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matrices: extra threads only add contention on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _features(n: int = 300, d: int = 16, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping class clusters, non-negative like pooled CNN features (not separable)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.relu(centers[y] + 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return x.to(dtype), y


def _objective(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, wd: float, ls: float
) -> torch.Tensor:
    return F.cross_entropy(x @ w.T + b, y, label_smoothing=ls) + 0.5 * wd * w.pow(2).sum()


def _adam(x: torch.Tensor, y: torch.Tensor, wd: float, ls: float, steps: int = 3000) -> float:
    w = torch.zeros(C, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(C, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        _objective(x, y, w, b, wd, ls).backward()
        opt.step()
    with torch.no_grad():
        return float(_objective(x, y, w, b, wd, ls))


@pytest.mark.parametrize(("wd", "ls"), [(1e-3, 0.0), (1e-2, 0.1)])
def test_reaches_the_optimum_of_the_convex_problem(wd: float, ls: float) -> None:
    x, y = _features()
    fit = fit_linear_lbfgs(x, y, C, weight_decay=wd, label_smoothing=ls)
    assert fit.converged and fit.grad_norm < 1e-5 * fit.initial_grad_norm
    # The optimality conditions, by hand: the loss gradient is (softmax - smoothed one-hot) per
    # sample; the weight's is balanced by weight_decay x W, the bias has no penalty.
    p = torch.softmax(x @ fit.weight.T + fit.bias, dim=1)
    target = F.one_hot(y, C).double() * (1 - ls) + ls / C
    assert torch.allclose((p - target).T @ x / len(y) + wd * fit.weight, torch.zeros_like(fit.weight), atol=1e-5)
    assert torch.allclose((p - target).mean(0), torch.zeros(C, dtype=x.dtype), atol=1e-5)
    assert fit.losses == sorted(fit.losses, reverse=True)
    assert fit.losses[-1] <= _adam(x, y, wd, ls) + 1e-10


def test_float32_features_reach_the_optimum_to_float32_precision() -> None:
    x, y = _features(dtype=torch.float32)
    fit = fit_linear_lbfgs(x, y, C, weight_decay=1e-3)
    assert fit.weight.dtype == torch.float32 and fit.weight.device == x.device
    assert fit.converged and fit.grad_norm < 1e-3 * fit.initial_grad_norm
    assert fit.losses[-1] <= _adam(x, y, 1e-3, 0.0) + 1e-6


def test_half_features_are_fitted_in_float32() -> None:
    x, y = _features(dtype=torch.float16)
    fit = fit_linear_lbfgs(x, y, C, weight_decay=1e-3, options=replace(FIT_OPTIONS, max_iter=30))
    assert fit.weight.dtype == torch.float32 and torch.isfinite(fit.weight).all()


def test_a_fit_is_deterministic() -> None:
    x, y = _features(dtype=torch.float32)
    a = fit_linear_lbfgs(x, y, C, weight_decay=1e-3, options=replace(FIT_OPTIONS, max_iter=40))
    b = fit_linear_lbfgs(x, y, C, weight_decay=1e-3, options=replace(FIT_OPTIONS, max_iter=40))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.losses == b.losses


def test_weight_decay_and_label_smoothing_change_the_optimum() -> None:
    x, y = _features()
    base = fit_linear_lbfgs(x, y, C, weight_decay=1e-3)
    strong = fit_linear_lbfgs(x, y, C, weight_decay=1e-1)
    smooth = fit_linear_lbfgs(x, y, C, weight_decay=1e-3, label_smoothing=0.2)
    assert strong.weight.norm() < 0.5 * base.weight.norm()
    assert not torch.allclose(smooth.weight, base.weight, atol=1e-3)


def test_probe_runs_one_outer_step_at_a_time() -> None:
    x, y = _features()
    probe = LbfgsProbe(x, y, C, weight_decay=1e-3, options=LbfgsOptions(iters_per_step=5))
    assert probe.lr == 1.0
    losses, iterations = [], []
    while not probe.converged:
        before = probe.iterations
        losses.append(probe.step())
        iterations.append(probe.iterations - before)
        assert probe.last_step_size > 0
        assert len(losses) < 100
    assert max(iterations) == 5 and probe.losses == losses
    assert losses == sorted(losses, reverse=True) and losses[0] < probe.initial_loss
    assert probe.step() <= losses[-1]  # a step after convergence loses nothing


def test_a_restored_probe_continues_exactly() -> None:
    x, y = _features()

    def probe() -> LbfgsProbe:
        return LbfgsProbe(x, y, C, weight_decay=1e-3, label_smoothing=0.1, options=LbfgsOptions(iters_per_step=4))

    straight = probe()
    for _ in range(4):
        straight.step()
    first = probe()
    first.step()
    first.step()
    saved = copy.deepcopy(first.state_dict())
    resumed = probe()
    resumed.load_state_dict(saved)
    resumed.step()
    resumed.step()
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    assert resumed.losses == straight.losses and resumed.iterations == straight.iterations


def test_init_starts_from_given_weights_and_on_step_sees_each_step() -> None:
    x, y = _features()
    fit = fit_linear_lbfgs(x, y, C, weight_decay=1e-3)
    seen: list[float] = []
    again = fit_linear_lbfgs(
        x, y, C, weight_decay=1e-3, init=(fit.weight, fit.bias), on_step=lambda p: seen.append(p.losses[-1])
    )
    assert seen == again.losses and len(seen) == 1 and again.iterations <= 2
    assert again.losses[0] == pytest.approx(fit.losses[-1], abs=1e-12)


def test_iterations_stop_at_max_iter() -> None:
    x, y = _features()
    fit = fit_linear_lbfgs(x, y, C, weight_decay=0.0, options=LbfgsOptions(iters_per_step=5, max_iter=12))
    assert fit.iterations <= 12 + 4 and not fit.converged and len(fit.losses) == 3


@pytest.mark.parametrize(
    ("labels", "message"),
    [(torch.full((300,), C), "labels must be in"), (torch.zeros(299, dtype=torch.long), "need features")],
)
def test_bad_inputs_are_errors(labels: torch.Tensor, message: str) -> None:
    x, _ = _features()
    with pytest.raises(ValueError, match=message):
        LbfgsProbe(x, labels, C, weight_decay=1e-3)
