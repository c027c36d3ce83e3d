"""Hyperparameter sweep: random search with successive halving, coarse to fine.

``run_sweep`` searches the ranges of a spec's ``SweepSpec`` and returns the recipe the final
model is trained from; the caller trains it (the worker does, with its checkpoints).

Each round samples ``trials`` configurations: learning rate and weight decay log-uniformly in
their ranges, the optimizer, freeze depth and head dropout uniformly from their choice lists
(the spec's own value when a list is empty). Every trial is the spec with those values, one
ensemble member, no early stopping and the rung's epochs. Successive halving trains all of
them ``min_epochs`` epochs, keeps the best ``ceil(n / eta)`` by validation accuracy (ties: the
lower validation loss), trains those ``eta`` times longer, and so on until one remains or a
rung reaches ``spec.epochs``. A rung retrains its trials from scratch rather than continuing
the previous rung's weights: each rung is then a complete run with its own schedule (a cosine
schedule ends where it should), at the price of re-doing the earlier epochs; the total is
about ``trials * min_epochs * rungs`` epochs per round. Later rounds narrow both log ranges
around the best value so far (by ``(high / low) ** (1 / 4)`` either way, within the original
range) and keep the best choices fixed. The final recipe is the spec with the best values and
its own epochs, ensemble and patience.

All trials share ``spec.seed``, so they see the same train/validation split and initial head,
and differ only in their hyperparameters.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import ImageArray
from .errors import TrainingCancelled, TrainingError
from .report import finite_or_none
from .results import TrainResult
from .spec import EpochRecord, SweepSpec, TrainSpec
from .training import TrainHooks, train

__all__ = [
    "RoundInfo",
    "SweepResult",
    "TrialConfig",
    "TrialRecord",
    "narrow_range",
    "rung_epochs",
    "run_sweep",
    "sample_configs",
    "with_sweep",
]

TrainFn = Callable[..., TrainResult]


@dataclass(frozen=True)
class TrialConfig:
    """The values one trial tries; everything else comes from the spec.

    Attributes:
        lr: optimizer learning rate.
        weight_decay: optimizer weight decay.
        optimizer: optimizer name (``OPTIMIZERS``).
        freeze_stages: ``freeze.stages``.
        head_dropout: dropout on the pooled features.
    """

    lr: float
    weight_decay: float
    optimizer: str
    freeze_stages: int
    head_dropout: float

    def apply(self, spec: TrainSpec, **overrides: Any) -> TrainSpec:
        """``spec`` with these values and ``sweep=None``, validated again; ``overrides`` set top-level fields."""
        d = spec.model_dump()
        d["optimizer"].update(name=self.optimizer, lr=self.lr, weight_decay=self.weight_decay)
        d["freeze"]["stages"] = self.freeze_stages
        d.update(head_dropout=self.head_dropout, sweep=None, **overrides)
        return TrainSpec.model_validate(d)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "optimizer": self.optimizer,
            "freeze_stages": self.freeze_stages,
            "head_dropout": self.head_dropout,
        }


@dataclass
class TrialRecord:
    """One trial trained at one rung (a configuration promoted twice has three records).

    Attributes:
        trial: the configuration's id, 0-based and unique across rounds (like ``EpochRecord.member``).
        round: 0-based coarse-to-fine round.
        rung: 0-based successive-halving rung.
        epochs: epochs trained at this rung (from scratch).
        config: the values tried.
        status: ``running``, ``done`` or ``failed`` (training diverged: ranked last).
        outcome: after the rung: ``promoted`` (trained again at the next rung), ``stopped``
            (dropped by halving) or ``best`` (the round's winner); None while the rung runs.
        val_acc: validation accuracy of the trial's best epoch.
        val_loss: validation loss of that epoch.
        seconds: wall time of the trial.
        error: why a failed trial failed.
    """

    trial: int
    round: int
    rung: int
    epochs: int
    config: TrialConfig
    status: str = "running"
    outcome: str | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def score(self) -> tuple[float, float]:
        """Sort key, larger is better: validation accuracy, then lower loss; failed trials last."""
        if self.status != "done" or self.val_acc is None:
            return (-math.inf, -math.inf)
        loss = self.val_loss if self.val_loss is not None and math.isfinite(self.val_loss) else math.inf
        return (self.val_acc, -loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "round": self.round,
            "rung": self.rung,
            "epochs": self.epochs,
            **self.config.to_dict(),
            "status": self.status,
            "outcome": self.outcome,
            "val_acc": self.val_acc,
            "val_loss": finite_or_none(self.val_loss),
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRecord:
        return cls(
            trial=int(d["trial"]),
            round=int(d["round"]),
            rung=int(d["rung"]),
            epochs=int(d["epochs"]),
            config=TrialConfig(
                lr=float(d["lr"]),
                weight_decay=float(d["weight_decay"]),
                optimizer=str(d["optimizer"]),
                freeze_stages=int(d["freeze_stages"]),
                head_dropout=float(d["head_dropout"]),
            ),
            status=str(d["status"]),
            outcome=d.get("outcome"),
            val_acc=d.get("val_acc"),
            val_loss=d.get("val_loss"),
            seconds=float(d.get("seconds", 0.0)),
            error=d.get("error"),
        )


@dataclass
class RoundInfo:
    """The ranges one round sampled from (coarse to fine: each narrower than the one before)."""

    round: int
    lr: tuple[float, float]
    weight_decay: tuple[float, float]
    trials: int

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "lr": list(self.lr), "weight_decay": list(self.weight_decay),
                "trials": self.trials}


@dataclass
class SweepResult:
    """Everything a sweep did and what it chose.

    Attributes:
        trials: every trial record, in the order they ran (one per trial and rung).
        rounds: the ranges of each round.
        best: the record the final recipe comes from (the best round winner).
        final_spec: ``spec`` with the best values, ``sweep=None`` and its own epochs, ensemble and
            patience: what the caller trains. None until the sweep has finished.
        seconds: wall time of the sweep.
    """

    trials: list[TrialRecord] = field(default_factory=list)
    rounds: list[RoundInfo] = field(default_factory=list)
    best: TrialRecord | None = None
    final_spec: TrainSpec | None = None
    seconds: float = 0.0

    @property
    def epochs_trained(self) -> int:
        """Epochs spent on trials (the sweep's cost in epochs)."""
        return sum(r.epochs for r in self.trials if r.status == "done")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: what the job record and the model report show."""
        return {
            "trials": [r.to_dict() for r in self.trials],
            "rounds": [r.to_dict() for r in self.rounds],
            "best": self.best.to_dict() if self.best is not None else None,
            "final_spec": self.final_spec.model_dump(mode="json") if self.final_spec is not None else None,
            "epochs_trained": self.epochs_trained,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepResult:
        """The inverse of ``to_dict`` (a finished sweep stored by the worker)."""
        return cls(
            trials=[TrialRecord.from_dict(r) for r in d["trials"]],
            rounds=[
                RoundInfo(
                    int(r["round"]),
                    (float(r["lr"][0]), float(r["lr"][1])),
                    (float(r["weight_decay"][0]), float(r["weight_decay"][1])),
                    int(r["trials"]),
                )
                for r in d["rounds"]
            ],
            best=TrialRecord.from_dict(d["best"]) if d.get("best") else None,
            final_spec=TrainSpec.model_validate(d["final_spec"]) if d.get("final_spec") else None,
            seconds=float(d.get("seconds", 0.0)),
        )


def with_sweep(result: TrainResult, sweep: SweepResult) -> TrainResult:
    """``result`` with ``sweep.to_dict()`` added to its report (and so to the saved model's manifest)."""
    return dataclasses.replace(result, sections={**result.sections, "sweep": sweep.to_dict()})


# --------------------------------------------------------------------------- building blocks


def rung_epochs(sweep: SweepSpec, rung: int, max_epochs: int) -> int:
    """Epochs of successive-halving rung ``rung``: ``min_epochs * eta ** rung``, at most ``max_epochs``."""
    return min(sweep.min_epochs * sweep.eta**rung, max_epochs)


def narrow_range(best: float, current: tuple[float, float], bounds: tuple[float, float]) -> tuple[float, float]:
    """The next round's log range: ``best`` times / divided by ``(high / low) ** (1 / 4)`` of
    ``current``, clipped to ``bounds`` (the sweep's original range); half as wide in log space."""
    lo, hi = current
    f = (hi / lo) ** 0.25
    return (max(bounds[0], best / f), min(bounds[1], best * f))


def sample_configs(
    n: int,
    rng: np.random.Generator,
    *,
    lr: tuple[float, float],
    weight_decay: tuple[float, float],
    optimizers: list[str],
    freeze_stages: list[int],
    head_dropout: list[float],
) -> list[TrialConfig]:
    """``n`` configurations: lr and weight decay log-uniform in their ranges, the rest uniform over
    the choice lists (each list must be non-empty; a one-element list fixes the value)."""
    lrs = _log_uniform(rng, lr, n)
    wds = _log_uniform(rng, weight_decay, n)
    opt = rng.integers(len(optimizers), size=n)
    stages = rng.integers(len(freeze_stages), size=n)
    drops = rng.integers(len(head_dropout), size=n)
    return [
        TrialConfig(
            lr=float(lrs[k]),
            weight_decay=float(wds[k]),
            optimizer=optimizers[opt[k]],
            freeze_stages=int(freeze_stages[stages[k]]),
            head_dropout=float(head_dropout[drops[k]]),
        )
        for k in range(n)
    ]


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    lo, hi = bounds
    # Clipped because exp(log(x)) can land a rounding error outside [lo, hi].
    return np.clip(np.exp(rng.uniform(math.log(lo), math.log(hi), size=n)), lo, hi)


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    data: ImageArray,
    spec: TrainSpec,
    *,
    train_fn: TrainFn = train,
    on_trial: Callable[[TrialRecord, SweepResult], None] | None = None,
    on_epoch: Callable[[TrialRecord, EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Search ``spec.sweep``'s ranges and return the recipe to train (``SweepResult.final_spec``).

    Args:
        data: decoded images, as for ``train``.
        spec: a recipe with ``sweep`` set.
        train_fn: trains one trial; called like ``train`` with ``hooks`` (tests pass a fake). Bind the
            device, threads and cache bounds with ``functools.partial``.
        on_trial: called with the record and the sweep so far when a trial starts
            (``status == "running"``) and when it ends.
        on_epoch: called with the running trial's record and each of its ``EpochRecord``.
        should_stop: polled before each trial and, through ``train_fn``, between batches.
        log: receives human-readable progress lines.

    Returns:
        Every trial, the best one and the final recipe.

    Raises:
        ValueError: ``spec`` has no sweep (a sweep that does not fit the rest of the spec is refused
            by ``TrainSpec`` itself, when the job is submitted).
        TrainingCancelled: ``should_stop`` returned True.
        TrainingError: every trial of a rung failed (diverged), or the data cannot be trained on.
    """
    sweep = spec.sweep
    if sweep is None:
        raise ValueError("run_sweep needs a spec with a sweep")
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    result = SweepResult()
    lr_range, wd_range = sweep.lr, sweep.weight_decay
    optimizers = sweep.optimizers or [spec.optimizer.name]
    stages = sweep.freeze_stages or [spec.freeze.stages]
    dropouts = sweep.head_dropout or [spec.head_dropout]

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            raise TrainingCancelled("sweep cancelled")

    def run_trial(record: TrialRecord) -> None:
        check_stop()
        result.trials.append(record)
        if on_trial is not None:
            on_trial(record, result)
        c = record.config
        say(
            f"sweep round {record.round + 1}/{sweep.rounds} rung {record.rung + 1}: trial {record.trial + 1} "
            f"({record.epochs} epochs) {c.optimizer} lr {c.lr:.3g} wd {c.weight_decay:.3g} "
            f"freeze {c.freeze_stages} dropout {c.head_dropout:g}"
        )
        one_member = {**spec.ensemble.model_dump(), "members": 1, "backbones": []}
        trial_spec = c.apply(spec, epochs=record.epochs, patience=None, ensemble=one_member)
        t0 = time.perf_counter()
        try:
            hooks = TrainHooks(
                on_epoch=(lambda rec: on_epoch(record, rec)) if on_epoch is not None else None,
                should_stop=should_stop,
                log=(lambda msg: say(f"trial {record.trial + 1}: {msg}")) if log is not None else None,
            )
            out = train_fn(data, trial_spec, hooks=hooks)
        except TrainingError as exc:
            # A diverging learning rate is a result, not a reason to stop searching.
            record.status, record.error = "failed", str(exc)
            say(f"trial {record.trial + 1} failed: {exc}")
        else:
            record.status, record.val_acc, record.val_loss = "done", float(out.val_acc), float(out.val_loss)
            say(f"trial {record.trial + 1}: val acc {out.val_acc:.3f} loss {out.val_loss:.4f}")
        record.seconds = time.perf_counter() - t0
        if on_trial is not None:
            on_trial(record, result)

    next_id = 0
    for rnd in range(sweep.rounds):
        if rnd > 0:
            assert result.best is not None
            b = result.best.config
            lr_range = narrow_range(b.lr, lr_range, sweep.lr)
            wd_range = narrow_range(b.weight_decay, wd_range, sweep.weight_decay)
            optimizers, stages, dropouts = [b.optimizer], [b.freeze_stages], [b.head_dropout]
        result.rounds.append(RoundInfo(rnd, lr_range, wd_range, sweep.trials))
        # One stream per round, from the spec's seed: the same spec samples the same trials.
        rng = np.random.default_rng([spec.seed, rnd])
        configs = sample_configs(
            sweep.trials, rng, lr=lr_range, weight_decay=wd_range,
            optimizers=optimizers, freeze_stages=stages, head_dropout=dropouts,
        )
        alive = list(zip(range(next_id, next_id + len(configs)), configs, strict=True))
        next_id += len(configs)
        rung = 0
        while True:
            epochs = rung_epochs(sweep, rung, spec.epochs)
            records = [TrialRecord(trial=i, round=rnd, rung=rung, epochs=epochs, config=c) for i, c in alive]
            for record in records:
                run_trial(record)
            ranked = sorted(records, key=lambda r: r.score, reverse=True)  # stable: ties keep trial order
            if ranked[0].status != "done":
                raise TrainingError(
                    f"every trial of sweep round {rnd + 1} rung {rung + 1} failed; first: {ranked[0].error}"
                )
            keep = math.ceil(len(ranked) / sweep.eta)
            last = len(ranked) == 1 or epochs >= spec.epochs or keep == 1
            for k, record in enumerate(ranked):
                if last:
                    record.outcome = "best" if k == 0 else "stopped"
                else:
                    record.outcome = "promoted" if k < keep and record.status == "done" else "stopped"
            if last:
                break
            alive = [(r.trial, r.config) for r in ranked if r.outcome == "promoted"]
            rung += 1
        winner = ranked[0]
        say(f"sweep round {rnd + 1}: best trial {winner.trial + 1}, val acc {winner.val_acc:.3f}")
        if result.best is None or winner.score > result.best.score:
            result.best = winner

    assert result.best is not None
    result.final_spec = result.best.config.apply(spec)
    result.seconds = time.perf_counter() - start
    b = result.best.config
    say(
        f"sweep done: trial {result.best.trial + 1} ({b.optimizer}, lr {b.lr:.3g}, wd {b.weight_decay:.3g}, "
        f"freeze {b.freeze_stages}, dropout {b.head_dropout:g}), val acc {result.best.val_acc:.3f}, "
        f"{result.epochs_trained} epochs in {result.seconds:.1f}s"
    )
    return result
