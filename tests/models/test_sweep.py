"""The hyperparameter sweep: sampling, successive halving, coarse to fine, the final recipe."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from models.data import ImageArray
from models.errors import TrainingCancelled, TrainingError
from models.spec import TrainSpec
from models.sweep import SweepResult, narrow_range, run_sweep, sample_configs, with_sweep
from models.training import train

LR = (1e-4, 1e-1)


class FakeTrain:
    """Stands in for ``train``: a validation accuracy (and loss) as a function of the trial's spec."""

    def __init__(self, acc: Callable[[TrainSpec], float], loss: Callable[[TrainSpec], float] | None = None) -> None:
        self.acc = acc
        self.loss = loss or (lambda s: 1.0 - acc(s))
        self.specs: list[TrainSpec] = []

    def __call__(self, data, spec: TrainSpec, **kwargs) -> SimpleNamespace:
        assert set(kwargs) == {"hooks"}  # device, threads and cache bounds are bound by the caller
        self.specs.append(spec)
        return SimpleNamespace(val_acc=self.acc(spec), val_loss=self.loss(spec))


def _spec(tiny_spec, epochs: int = 8, **sweep: object) -> TrainSpec:
    return tiny_spec(epochs=epochs, patience=3, ensemble={"members": 2}, sweep={"lr": list(LR), **sweep})


def _lr(spec: TrainSpec) -> float:
    return spec.optimizer.lr


def test_sampled_values_are_log_uniform_within_range() -> None:
    configs = sample_configs(
        6000, np.random.default_rng(0), lr=LR, weight_decay=(1e-6, 1e-2),
        optimizers=["adam"], freeze_stages=[3], head_dropout=[0.2],
    )
    for values, (lo, hi) in (([c.lr for c in configs], LR), ([c.weight_decay for c in configs], (1e-6, 1e-2))):
        x = np.log(values)
        assert lo <= min(values) and max(values) <= hi
        # Uniform in log space: every tenth of the log range holds about a tenth of the samples
        # (a linear uniform would put ~90% of the lrs in the top decade).
        counts = np.histogram(x, bins=10, range=(math.log(lo), math.log(hi)))[0]
        assert counts.min() > 0.08 * len(x) and counts.max() < 0.12 * len(x), counts


def test_sweep_trials_sample_lr_log_uniformly(tiny_spec) -> None:
    lrs = []
    for seed in range(5):
        fake = FakeTrain(lambda s: 0.5)
        spec = _spec(tiny_spec, trials=64, rounds=1, eta=8, min_epochs=8).model_copy(update={"seed": seed})
        out = run_sweep(None, spec, train_fn=fake)
        assert len(out.trials) == 64 and all(r.rung == 0 for r in out.trials)
        lrs += [r.config.lr for r in out.trials]
    x = np.log10(lrs)
    assert LR[0] <= min(lrs) and max(lrs) <= LR[1]
    decades = np.histogram(x, bins=3, range=(-4, -1))[0] / len(x)
    assert np.all(np.abs(decades - 1 / 3) < 0.08), decades


@pytest.mark.parametrize(
    ("trials", "eta", "min_epochs", "epochs", "rungs"),
    [
        (8, 2, 1, 8, [(8, 1), (4, 2), (2, 4)]),  # halves until one remains
        (8, 2, 1, 3, [(8, 1), (4, 2), (2, 3)]),  # epochs capped at spec.epochs: the cap ends it
        (9, 3, 2, 5, [(9, 2), (3, 5)]),
        (4, 2, 4, 2, [(4, 2)]),  # min_epochs above the budget: one rung at spec.epochs
    ],
)
def test_successive_halving_keeps_the_top_by_val_acc(tiny_spec, trials, eta, min_epochs, epochs, rungs) -> None:
    fake = FakeTrain(lambda s: _lr(s) / LR[1])  # a larger lr validates better
    spec = _spec(tiny_spec, epochs=epochs, trials=trials, eta=eta, min_epochs=min_epochs, rounds=1)
    out = run_sweep(None, spec, train_fn=fake)

    by_rung = [[r for r in out.trials if r.rung == k] for k in range(len(rungs))]
    assert [(len(rs), rs[0].epochs) for rs in by_rung] == rungs
    assert len(out.trials) == sum(n for n, _ in rungs)
    assert all(r.epochs == e for rs, (_, e) in zip(by_rung, rungs, strict=True) for r in rs)
    for k, rs in enumerate(by_rung[:-1]):
        keep = math.ceil(len(rs) / eta)
        top = sorted(rs, key=lambda r: r.config.lr, reverse=True)[:keep]
        assert {r.trial for r in rs if r.outcome == "promoted"} == {r.trial for r in top}
        assert {r.trial for r in by_rung[k + 1]} == {r.trial for r in top}
    last = by_rung[-1]
    assert [r.outcome for r in last].count("best") == 1
    assert out.best is not None and out.best.config.lr == max(r.config.lr for r in out.trials)
    assert out.best.outcome == "best" and out.best.rung == len(rungs) - 1

    # Each trial: the spec with its values, one member, no early stopping, the rung's epochs.
    for s, r in zip(fake.specs, out.trials, strict=True):
        assert (s.epochs, s.optimizer.lr, s.optimizer.weight_decay) == (r.epochs, r.config.lr, r.config.weight_decay)
        assert s.ensemble.members == 1 and s.patience is None and s.sweep is None and s.seed == spec.seed


def test_ties_in_accuracy_go_to_the_lower_loss(tiny_spec) -> None:
    fake = FakeTrain(lambda s: 0.75, loss=lambda s: _lr(s))  # same accuracy; a smaller lr has a lower loss
    out = run_sweep(None, _spec(tiny_spec, trials=6, eta=3, rounds=1), train_fn=fake)
    rung0 = [r for r in out.trials if r.rung == 0]
    assert {r.trial for r in rung0 if r.outcome == "promoted"} == {
        r.trial for r in sorted(rung0, key=lambda r: r.config.lr)[:2]
    }
    assert out.best is not None and out.best.config.lr == min(r.config.lr for r in rung0)


def test_coarse_to_fine_narrows_around_the_best(tiny_spec) -> None:
    target = -2.4  # log10 of the best lr
    fake = FakeTrain(lambda s: 1.0 - abs(math.log10(_lr(s)) - target) / 3)
    spec = _spec(tiny_spec, trials=8, eta=2, rounds=3, weight_decay=[1e-6, 1e-2])
    out = run_sweep(None, spec, train_fn=fake)

    assert [r.round for r in out.rounds] == [0, 1, 2]
    for before, after in zip(out.rounds, out.rounds[1:], strict=False):
        assert math.log(after.lr[1] / after.lr[0]) <= 0.5 * math.log(before.lr[1] / before.lr[0]) + 1e-9
        assert math.log(after.weight_decay[1] / after.weight_decay[0]) <= (
            0.5 * math.log(before.weight_decay[1] / before.weight_decay[0]) + 1e-9
        )
        assert LR[0] <= after.lr[0] <= after.lr[1] <= LR[1]
    round_best = {}
    for rnd in range(3):
        trials = [r for r in out.trials if r.round == rnd and r.rung == 0]
        assert len(trials) == 8
        lo, hi = out.rounds[rnd].lr
        assert all(lo <= r.config.lr <= hi for r in trials)
        round_best[rnd] = next(r for r in out.trials if r.round == rnd and r.outcome == "best")
    # Round 2 samples within (hi/lo)**(1/4) of round 1's winner: closer to the optimum on average.
    first = round_best[0].config.lr
    second = [r.config.lr for r in out.trials if r.round == 1 and r.rung == 0]
    assert all(abs(math.log10(x / first)) <= 0.75 + 1e-9 for x in second)
    dist = [np.mean([abs(math.log10(r.config.lr) - target) for r in out.trials if r.round == k]) for k in (0, 1)]
    assert dist[1] < dist[0]
    assert out.best is not None and abs(math.log10(out.best.config.lr) - target) <= abs(math.log10(first) - target)
    # Trial ids are unique across rounds.
    assert len({(r.trial, r.rung) for r in out.trials}) == len(out.trials)


def test_narrow_range_is_clipped_to_the_original() -> None:
    lo, hi = narrow_range(1e-4, (1e-4, 1e-1), (1e-4, 1e-1))
    assert lo == 1e-4 and hi == pytest.approx(1e-4 * 1e3**0.25)
    lo, hi = narrow_range(1e-2, (1e-3, 1e-1), (1e-4, 1e-1))
    assert (lo, hi) == pytest.approx((1e-2 / 100**0.25, 1e-2 * 100**0.25))


def test_choices_are_honoured_and_the_final_spec_carries_the_best(tiny_spec) -> None:
    def acc(s: TrainSpec) -> float:  # sgd, 2 frozen groups and dropout 0.5 win; lr decides the rest
        return (s.optimizer.name == "sgd") + (s.freeze.stages == 2) + (s.head_dropout == 0.5) + _lr(s)

    fake = FakeTrain(lambda s: acc(s) / 4)
    spec = tiny_spec(
        epochs=4, patience=2, ensemble={"members": 2}, freeze={"mode": "first_n", "stages": 1},
        sweep={"trials": 32, "eta": 4, "rounds": 2, "optimizers": ["adam", "sgd", "nesterov"],
               "freeze_stages": [0, 2], "head_dropout": [0.0, 0.5]},
    )
    out = run_sweep(None, spec, train_fn=fake)
    first = [r for r in out.trials if r.round == 0 and r.rung == 0]
    assert {r.config.optimizer for r in first} == {"adam", "sgd", "nesterov"}
    assert {r.config.freeze_stages for r in first} == {0, 2}
    assert {r.config.head_dropout for r in first} == {0.0, 0.5}
    for s, r in zip(fake.specs, out.trials, strict=True):  # what was trained is what was recorded
        assert (s.optimizer.name, s.freeze.stages, s.head_dropout) == (
            r.config.optimizer, r.config.freeze_stages, r.config.head_dropout
        )
    # Later rounds keep the best choices fixed.
    assert {(r.config.optimizer, r.config.freeze_stages, r.config.head_dropout)
            for r in out.trials if r.round == 1} == {("sgd", 2, 0.5)}

    final = out.final_spec
    assert out.best is not None and final is not None
    assert (final.optimizer.name, final.freeze.stages, final.head_dropout) == ("sgd", 2, 0.5)
    assert (final.optimizer.lr, final.optimizer.weight_decay) == (out.best.config.lr, out.best.config.weight_decay)
    assert final.sweep is None and final.epochs == 4 and final.patience == 2 and final.ensemble.members == 2
    assert final.model_dump(exclude={"optimizer", "freeze", "head_dropout", "sweep"}) == spec.model_dump(
        exclude={"optimizer", "freeze", "head_dropout", "sweep"}
    )


def test_empty_choices_keep_the_spec_values(tiny_spec) -> None:
    fake = FakeTrain(lambda s: 0.5)
    out = run_sweep(None, _spec(tiny_spec, trials=4, rounds=1), train_fn=fake)
    spec = _spec(tiny_spec)
    assert {(s.optimizer.name, s.freeze.stages, s.head_dropout) for s in fake.specs} == {
        (spec.optimizer.name, spec.freeze.stages, spec.head_dropout)
    }
    assert out.final_spec is not None and out.final_spec.optimizer.name == spec.optimizer.name


def test_same_seed_same_sweep(tiny_spec) -> None:
    def trials(seed: int) -> list[dict]:
        spec = _spec(tiny_spec, trials=8, rounds=2, optimizers=["adam", "sgd"]).model_copy(update={"seed": seed})
        out = run_sweep(None, spec, train_fn=FakeTrain(lambda s: _lr(s) * 5))
        return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in out.trials]

    assert trials(3) == trials(3)
    assert [t["lr"] for t in trials(3)] != [t["lr"] for t in trials(4)]


def test_a_diverging_trial_ranks_last(tiny_spec) -> None:
    def acc(s: TrainSpec) -> float:
        if _lr(s) > 1e-2:
            raise TrainingError("training diverged (loss nan)")
        return _lr(s) * 10

    out = run_sweep(None, _spec(tiny_spec, trials=12, eta=2, rounds=1), train_fn=FakeTrain(acc))
    failed = [r for r in out.trials if r.status == "failed"]
    assert failed and all(r.outcome == "stopped" and "diverged" in (r.error or "") for r in failed)
    assert out.best is not None and out.best.config.lr <= 1e-2
    assert out.to_dict()["epochs_trained"] == sum(r.epochs for r in out.trials if r.status == "done")

    def never(s: TrainSpec) -> float:
        raise TrainingError("training diverged")

    with pytest.raises(TrainingError, match="every trial"):
        run_sweep(None, _spec(tiny_spec, trials=3, rounds=1), train_fn=FakeTrain(never))


def test_cancel_stops_the_sweep(tiny_spec) -> None:
    calls = []
    seen = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingCancelled):
        run_sweep(None, _spec(tiny_spec, trials=8, rounds=2), train_fn=FakeTrain(lambda s: 0.5),
                  should_stop=stop, on_trial=lambda r, sw: seen.append(r.status))
    assert seen.count("done") == 3


def test_on_trial_reports_start_and_end(tiny_spec) -> None:
    events: list[tuple[int, int, str, int]] = []
    out = run_sweep(None, _spec(tiny_spec, trials=4, eta=2, rounds=1), train_fn=FakeTrain(lambda s: _lr(s)),
                    on_trial=lambda r, sw: events.append((r.trial, r.rung, r.status, len(sw.trials))))
    assert len(events) == 2 * len(out.trials)
    assert [e[2] for e in events] == ["running", "done"] * len(out.trials)
    assert [e[3] for e in events[::2]] == list(range(1, len(out.trials) + 1))


def test_a_sweep_that_does_not_fit_the_spec_is_refused(tiny_spec) -> None:
    # Refused when the job is submitted (a 422), before any data is loaded.
    with pytest.raises(ValueError, match="freeze_stages"):
        tiny_spec(sweep={"freeze_stages": [1, 2]})  # freeze.mode 'none': stages mean nothing
    with pytest.raises(ValueError, match="log-uniform range"):
        tiny_spec(sweep={"weight_decay": [1e-3, 5.0]})
    with pytest.raises(ValueError, match="needs a spec with a sweep"):
        run_sweep(None, tiny_spec(), train_fn=FakeTrain(lambda s: 0.5))


def test_to_dict_is_json_and_round_trips(tiny_spec) -> None:
    fake = FakeTrain(lambda s: _lr(s), loss=lambda s: math.inf if _lr(s) > 0.05 else 1.0)
    out = run_sweep(None, _spec(tiny_spec, trials=6, rounds=2), train_fn=fake)
    d = out.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert SweepResult.from_dict(d).to_dict() == d
    assert d["best"]["trial"] == out.best.trial and d["final_spec"]["sweep"] is None


def test_real_sweep_then_final_training(lfw_data, tiny_spec) -> None:
    # A third of the LFW crops: 10 epochs of training in all, a few seconds.
    keep = np.concatenate([np.flatnonzero(lfw_data.labels == k)[:32] for k in range(len(lfw_data.classes))])
    data = ImageArray(lfw_data.images[keep], lfw_data.labels[keep], list(lfw_data.classes))
    spec = tiny_spec(epochs=2, sweep={"trials": 4, "eta": 2, "min_epochs": 1, "rounds": 1, "lr": [1e-4, 3e-2]})
    epochs: list[tuple[int, int]] = []
    out = run_sweep(data, spec, train_fn=train, on_epoch=lambda r, e: epochs.append((r.trial, e.epoch)))
    assert [(r.rung, r.epochs) for r in out.trials] == [(0, 1)] * 4 + [(1, 2)] * 2
    assert all(r.status == "done" and 0.0 <= (r.val_acc or 0.0) <= 1.0 for r in out.trials)
    assert len(epochs) == 4 * 1 + 2 * 2
    assert out.best is not None and out.best.rung == 1 and out.final_spec is not None
    # The winner validates at least as well as the other finalist.
    assert out.best.score == max(r.score for r in out.trials if r.rung == 1)

    result = train(data, out.final_spec)
    report = with_sweep(result, out).report()
    assert report["sweep"] == out.to_dict() and report["val_acc"] == result.val_acc
    json.dumps(report, allow_nan=False)
