"""Each training technique of the job spec does what it claims inside ``train``.

Unit behaviour of the parts lives next to them (test_optim, test_lbfgs, test_heads, test_prefix);
these tests run the whole loop on the tiny test network and check that a field is not ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models import member
from models.artifact import load_predictor, save_artifact
from models.checkpoint import TrainState
from models.data import ImageArray, stratified_split
from models.ensemble import greedy_selection, polyak
from models.freezing import resolve_transfer
from models.member import Best as _Best
from models.optim import create_optimizer, cycle_ends, lr_at_epochs
from models.results import TrainedMember
from models.spec import FreezeSpec, TrainSpec
from models.training import TrainHooks, train
from models.transforms import normalize_batch

Spec = Callable[..., TrainSpec]


def test_ema_weights_are_the_exponential_average_of_the_raw_weights() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = polyak(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for _ in range(5):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = 0.9 * expected[k] + 0.1 * v.detach()
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)
    assert not torch.allclose(got["0.weight"], model.state_dict()["0.weight"])


def test_served_ema_weights_are_the_average_at_the_best_epoch(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    spec = tiny_spec(epochs=3, ensemble={"ema": True, "ema_decay": 0.9, "serve": "ema"})
    seen: dict[int, TrainState] = {}

    def keep(state: TrainState) -> None:
        assert state.ema is not None
        seen[state.epoch] = TrainState(**{**state.__dict__, "ema": {k: v.clone() for k, v in state.ema.items()}})

    result = train(lfw_data, spec, device="cpu", hooks=TrainHooks(checkpoint=keep))
    member = result.members[0]
    assert member.served == "ema"
    assert all("ema_val_acc" in r.extra for r in result.history)
    ema = seen[member.best_epoch].ema
    assert ema is not None
    for k, v in member.state_dict.items():
        torch.testing.assert_close(v, ema[k])
    runs = result.comparison["runs"][0]
    assert runs["ema_best_val_acc"] is not None and runs["raw_best_val_acc"] is not None


def test_the_training_loop_updates_the_ema_after_every_optimizer_step(
    lfw_data: ImageArray, tiny_spec: Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The EMA at the end of each epoch must be the Polyak recursion ema = d * ema + (1 - d) * w over the
    # raw weights w after every optimizer step, starting from the weights the EMA was created from.
    decay = 0.9
    start: dict[str, torch.Tensor] = {}
    raw: list[dict[str, torch.Tensor]] = []  # the raw weights after each optimizer step

    def floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def spy_polyak(model: torch.nn.Module, decay: float) -> object:
        assert not start, "one member, one EMA"
        start.update(floats(model))
        return polyak(model, decay)

    def spy_optimizer(model: torch.nn.Module, *args: object, **kwargs: object) -> torch.optim.Optimizer:
        opt = create_optimizer(model, *args, **kwargs)
        opt.register_step_post_hook(lambda *_: raw.append(floats(model)))
        return opt

    monkeypatch.setattr(member, "polyak", spy_polyak)
    monkeypatch.setattr(member, "create_optimizer", spy_optimizer)
    at_epoch: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}

    def keep(state: TrainState) -> None:
        assert state.ema is not None
        at_epoch[state.epoch] = (len(raw), {k: v.detach().clone() for k, v in state.ema.items()})

    spec = tiny_spec(epochs=2, ensemble={"ema": True, "ema_decay": decay, "serve": "raw"})
    train(lfw_data, spec, device="cpu", hooks=TrainHooks(checkpoint=keep))
    assert start and sorted(at_epoch) == [0, 1]
    assert at_epoch[0][0] == 5 and at_epoch[1][0] == 10  # 160 training images in batches of 32
    expected = dict(start)
    done = 0
    for steps, ema in at_epoch.values():
        for w in raw[done:steps]:
            expected = {k: decay * v + (1 - decay) * w[k] for k, v in expected.items()}
        done = steps
        assert expected.keys() <= ema.keys()
        for k, v in expected.items():
            torch.testing.assert_close(ema[k], v, msg=lambda m, k=k: f"{k}: {m}")
    # Not trivially equal to the start or to the raw weights: the average lags behind them.
    last = at_epoch[1][1]
    assert not torch.allclose(last["classifier.weight"], start["classifier.weight"])
    assert not torch.allclose(last["classifier.weight"], raw[-1]["classifier.weight"])


def test_snapshot_ensemble_of_three_cycles_stores_three_distinct_members(
    lfw_data: ImageArray, tiny_spec: Spec
) -> None:
    spec = tiny_spec(epochs=6, ensemble={"members": 3, "snapshot": True}, schedule={"warmup_epochs": 0})
    result = train(lfw_data, spec, device="cpu")
    assert [m.best_epoch for m in result.members] == cycle_ends(6, 3) == [1, 3, 5]
    assert {m.served for m in result.members} == {"snapshot"}
    assert len({r.member for r in result.history}) == 1 and len(result.history) == 6  # one run
    w = [m.state_dict["classifier.weight"] for m in result.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    lrs = [r.lr for r in result.history]
    assert lrs[2] > lrs[1] and lrs[4] > lrs[3]  # the cosine restarts at each cycle
    assert result.applied["snapshot"]["cycle_ends"] == [1, 3, 5]


def test_gradual_unfreezing_trains_one_more_group_every_k_epochs(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    spec = tiny_spec(epochs=4, freeze={"mode": "gradual", "stages": 3, "unfreeze_every": 1})
    result = train(lfw_data, spec, device="cpu")
    trainable = [r.extra["trainable_params"] for r in result.history]
    assert trainable[0] < trainable[1] < trainable[2] < trainable[3]
    assert result.applied["members"][0]["transfer"]["mode"] == "gradual"
    # Groups that stay frozen all run are cached once; the rest unfreeze over time.
    assert result.applied["members"][0]["cache"]["path"] == "memory"
    assert result.members[0].freeze["frozen_groups"][:3] == ["conv_stem+bn1", "blocks.0", "blocks.1"]


def test_auto_strategy_follows_the_data_size() -> None:
    auto = FreezeSpec(mode="auto")
    assert resolve_transfer(auto, 10, 8)[0].mode == "linear_probe"
    mid, why = resolve_transfer(auto, 100, 8)
    assert (mid.mode, mid.stages, mid.backbone_lr_mult) == ("first_n", 5, 0.1) and "top 2" in why
    assert resolve_transfer(auto, 1000, 8)[0].mode == "none"
    assert resolve_transfer(FreezeSpec(mode="first_n"), 10, 8)[0].mode == "first_n"


def test_auto_records_what_it_chose_and_why(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    result = train(lfw_data, tiny_spec(epochs=1, freeze={"mode": "auto"}), device="cpu")
    transfer = result.applied["members"][0]["transfer"]
    assert transfer["requested"] == "auto" and transfer["mode"] == "first_n"
    assert "80 training images per class" in transfer["why"]


def test_greedy_selection_drops_a_member_that_hurts() -> None:
    y = np.array([0, 1, 0, 1])
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    other = np.array([[0.6, 0.4], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    bad = np.array([[0.1, 0.9], [0.9, 0.1], [0.2, 0.8], [0.8, 0.2]])
    chosen, path = greedy_selection([bad, good, other], y)
    assert chosen == [1, 2] and path[1] < path[0]


def _val_probs(member: TrainedMember, data: ImageArray, val_idx: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits = member.build()(normalize_batch(data.images[val_idx], member.preprocess))
    return logits.float().softmax(dim=1).numpy()


def test_greedy_ensemble_keeps_a_subset_and_reports_all(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    spec = tiny_spec(epochs=1, ensemble={"members": 3, "greedy": True})
    result = train(lfw_data, spec, device="cpu")
    chosen = result.applied["greedy"]["chosen"]
    assert len(result.members) == len(chosen) >= 1
    assert len(result.comparison["members"]) == 3
    assert result.comparison["ensemble_all_val_acc"] == result.applied["greedy"]["all_val_acc"]
    # The same three members (same seeds) without selection, run through greedy selection here:
    # at one epoch two of them are far worse than the third, so selection must drop at least one.
    every = train(lfw_data, tiny_spec(epochs=1, ensemble={"members": 3}), device="cpu")
    assert [m.seed for m in every.members] == [spec.seed + i for i in range(3)]
    _, val_idx = stratified_split(lfw_data.labels, spec.val_fraction, spec.seed)
    y = lfw_data.labels[val_idx]
    probs = [_val_probs(m, lfw_data, val_idx) for m in every.members]
    want, _ = greedy_selection(probs, y)
    assert 1 <= len(want) < 3, want
    assert chosen == want
    assert [m.seed for m in result.members] == [spec.seed + c for c in want]
    served = np.mean([probs[c] for c in want], axis=0)
    assert result.val_acc == pytest.approx(float((served.argmax(axis=1) == y).mean()))


def test_the_monitored_metric_picks_the_best_weights() -> None:
    model = torch.nn.Linear(2, 2)
    by_acc, by_loss = _Best("val_acc"), _Best("val_loss")
    for best in (by_acc, by_loss):
        best.offer(0, "raw", 0.80, 0.50, np.zeros((1, 2)), model)
        best.offer(1, "raw", 0.85, 0.70, np.zeros((1, 2)), model)
    assert by_acc.epoch == 1 and by_loss.epoch == 0


def _expected_stop(values: list[tuple[float, float]], patience: int) -> tuple[int, int]:
    # (epochs run, best epoch) when smaller is better; the second value breaks ties
    best, best_epoch, since = (float("inf"), float("inf")), 0, 0
    for e, v in enumerate(values):
        if v < best:
            best, best_epoch, since = v, e, 0
        else:
            since += 1
        if since >= patience:
            return e + 1, best_epoch
    return len(values), best_epoch


def test_early_stopping_follows_the_monitored_metric(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    # A large lr: the loss falls for a few epochs, then bounces.
    opt = {"name": "adamw", "lr": 0.03}
    by_loss = train(lfw_data, tiny_spec(epochs=8, patience=1, monitor="val_loss", optimizer=opt), device="cpu")
    by_acc = train(lfw_data, tiny_spec(epochs=8, patience=1, monitor="val_acc", optimizer=opt), device="cpu")
    losses = [(r.val_loss, -r.val_acc) for r in by_loss.history]
    accs = [(-r.val_acc, r.val_loss) for r in by_acc.history]
    assert (len(losses), by_loss.members[0].best_epoch) == _expected_stop(losses, 1)
    assert (len(accs), by_acc.members[0].best_epoch) == _expected_stop(accs, 1)
    assert by_loss.members[0].stopped_early and by_acc.members[0].stopped_early
    assert by_loss.members[0].val_loss == min(v for v, _ in losses)  # the best weights are restored


def test_lbfgs_probe_converges_inside_train(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    spec = tiny_spec(
        epochs=4, optimizer={"name": "lbfgs"}, freeze={"mode": "linear_probe"}, head_dropout=0.0,
        augment={"preset": "none"}, weights="none",
    )
    result = train(lfw_data, spec, device="cpu")
    applied = result.applied["members"][0]
    assert applied["cache"]["prefix"] == "pool"
    assert applied["lbfgs"]["iterations"] > 4
    norms = [r.extra["grad_norm"] for r in result.history]
    assert norms[-1] < 1e-2 * norms[0] or norms[-1] < 1e-4
    losses = [r.train_loss for r in result.history]
    assert losses[-1] <= losses[0]


# With the cache on, the frozen layers never see a batch; "off" runs them on every training batch.
@pytest.mark.parametrize("cache", ["auto", "off"])
def test_frozen_batchnorm_statistics_stay_put_unless_asked(
    lfw_data: ImageArray, tiny_spec: Spec, cache: str
) -> None:
    frozen = train(
        lfw_data, tiny_spec(epochs=1, freeze={"mode": "first_n", "stages": 2}, cache={"mode": cache}), device="cpu"
    )
    moving = train(
        lfw_data, tiny_spec(epochs=1, freeze={"mode": "first_n", "stages": 2, "train_bn": True}, cache={"mode": cache}),
        device="cpu",
    )
    assert frozen.applied["members"][0]["cache"]["path"] == {"auto": "memory", "off": "off"}[cache]
    # Random init: running means start at zero.
    assert torch.count_nonzero(frozen.members[0].state_dict["bn1.running_mean"]) == 0
    assert torch.count_nonzero(moving.members[0].state_dict["bn1.running_mean"]) > 0
    assert moving.applied["members"][0]["cache"]["path"] == "off"


@pytest.mark.parametrize("name", ["step", "multistep", "one_cycle", "inverse_time"])
def test_every_epoch_records_the_scheduled_lr(lfw_data: ImageArray, tiny_spec: Spec, name: str) -> None:
    spec = tiny_spec(
        epochs=4, freeze={"mode": "linear_probe"}, schedule={"name": name, "warmup_epochs": 1, "step_epochs": 1,
                                                             "milestones": [1, 2]},
    )
    result = train(lfw_data, spec, device="cpu")
    want = lr_at_epochs(spec.schedule, 4, spec.optimizer.lr)
    assert [r.lr for r in result.history] == pytest.approx(want)
    assert len(set(want)) > 1


def test_discriminative_learning_rates(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    spec = tiny_spec(epochs=1, freeze={"mode": "none", "backbone_lr_mult": 0.1}, schedule={"name": "constant"})
    groups = train(lfw_data, spec, device="cpu").applied["members"][0]["param_groups"]
    lrs = {round(g["lr"], 8) for g in groups}
    assert lrs == {3e-3, 3e-4}


def test_a_model_with_every_head_option_saves_and_predicts_the_same(
    lfw_data: ImageArray, tiny_spec: Spec, tmp_path: Path
) -> None:
    spec = tiny_spec(epochs=1, drop_connect=0.3, drop_path=0.1, head_pool="fractional_max", label_smoothing=0.1,
                     image_size=64)
    pre_data = ImageArray(
        np.ascontiguousarray(np.repeat(np.repeat(lfw_data.images, 2, axis=1), 2, axis=2)), lfw_data.labels,
        lfw_data.classes,
    )
    result = train(pre_data, spec, device="cpu")
    assert result.members[0].head == {"drop_rate": 0.2, "drop_connect": 0.3, "drop_path": 0.1,
                                      "pool": "fractional_max", "features": "last"}
    predictor = load_predictor(save_artifact(result, spec, tmp_path / "m"), device="cpu")
    x = normalize_batch(pre_data.images[:6], result.preprocess)
    with torch.inference_mode():
        want = result.build_ensemble()(x)
        got = predictor.model(x)
    torch.testing.assert_close(got, want)


def test_the_record_says_when_stochastic_depth_has_nothing_to_drop(lfw_data: ImageArray, tiny_spec: Spec) -> None:
    # test_efficientnet has no residual block at all; Lite0 has some in every stage but the first and last.
    none = train(lfw_data, tiny_spec(epochs=1, drop_path=0.2), device="cpu")
    lite = {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "epochs": 1, "drop_path": 0.2}
    some = train(lfw_data, tiny_spec(**lite, freeze={"mode": "first_n", "stages": 6}), device="cpu")
    assert none.applied["members"][0]["drop_path"]["active_blocks"] == 0
    assert "nothing to drop" in none.applied["members"][0]["drop_path"]["note"]
    assert some.applied["members"][0]["drop_path"]["active_blocks"] > 0  # blocks.5 trains
    assert "note" not in some.applied["members"][0]["drop_path"]
