"""A time budget's deadline inside training, and the multi-stage head through save and load."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifact import load_predictor, save_artifact
from models.data import ImageArray
from models.spec import TrainSpec
from models.training import TrainHooks, _Run, train


def test_deadline_stops_mid_member_and_keeps_the_best_weights(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    torch.set_num_threads(1)
    spec = tiny_spec(epochs=500, ensemble={"members": 3})
    seen = []
    t0 = time.perf_counter()
    result = train(lfw_data, spec, device="cpu",
                   hooks=TrainHooks(deadline=t0 + 2.0, on_epoch=seen.append))
    took = time.perf_counter() - t0
    assert took < 2.0 + 1.5, took  # at most a batch and the ensemble's evaluation after it
    report = result.report()
    assert report["deadline"]["member"] == 0 and report["deadline"]["epoch"] is not None
    assert len(result.members) == 1  # members 2 and 3 never started
    member = result.members[0]
    assert 1 <= member.epochs_run < 500
    # The weights served are the best epoch's, not the last one's.
    best = max(seen, key=lambda r: (r.val_acc, -r.val_loss))
    assert member.best_epoch == best.epoch and member.val_acc == best.val_acc
    assert report["applied"]["members"][0]["stopped_by_deadline"]["epoch"] == member.epochs_run


def test_multi_stage_head_trains_saves_and_predicts(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    spec = tiny_spec(epochs=2, head_features="multi_stage", freeze={"mode": "linear_probe"})
    result = train(lfw_data, spec, device="cpu")
    applied = result.report()["applied"]["members"][0]
    assert applied["head"]["features"] == "multi_stage"
    assert applied["cache"]["path"] == "memory"  # every stage frozen: the joined features are cached
    dest = save_artifact(result, spec, tmp_path / "m")
    predictor = load_predictor(dest, device="cpu")
    from models.transforms import normalize_batch

    with torch.inference_mode():
        direct = result.build_ensemble()(normalize_batch(lfw_data.images[:8], result.preprocess)).numpy()
        loaded = predictor.model(normalize_batch(lfw_data.images[:8], result.preprocess)).numpy()
    assert np.allclose(direct, loaded, atol=1e-6)
    assert type(predictor.model.members[0]).__name__ == "MultiStageEfficientNet"


def test_multi_stage_needs_an_efficientnet() -> None:
    import pytest

    with pytest.raises(ValueError, match="EfficientNet"):
        TrainSpec.model_validate({"backbone": "resnet18", "weights": "none", "head_features": "multi_stage"})


def test_a_passed_deadline_still_trains_one_epoch_past_the_warm_up(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    # The warm-up epoch starts near lr 0: stopping after it alone served a random head (animal-mnist's
    # plain job at 0.084 held-out accuracy, issue #14). One epoch at the real lr comes first.
    torch.set_num_threads(1)
    spec = tiny_spec(epochs=6, schedule={"name": "cosine", "warmup_epochs": 1}, ensemble={"members": 2})
    result = train(lfw_data, spec, device="cpu", hooks=TrainHooks(deadline=time.perf_counter()))
    assert len(result.members) == 1 and result.members[0].epochs_run == 2
    assert result.report()["deadline"]["member"] == 0


def _slow_epochs(seconds: float) -> Callable[[object], None]:
    """An on_epoch hook that makes every epoch take ``seconds`` longer: a member of known pace."""
    return lambda _record: time.sleep(seconds)


def test_a_member_that_would_miss_the_deadline_is_not_started(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    # Each member takes M = 4 s of sleep (2 epochs of 2 s) plus its compute C; the deadline is at 8 s.
    # The first member ends before it while C < 4 s, and then 8 - M < M is left: the second is not
    # started (before, it started and the deadline cut it short).
    torch.set_num_threads(1)
    spec = tiny_spec(epochs=2, patience=None, ensemble={"members": 3})
    t0 = time.perf_counter()
    result = train(lfw_data, spec, device="cpu", hooks=TrainHooks(deadline=t0 + 8.0, on_epoch=_slow_epochs(2.0)))
    report = result.report()
    assert len(result.members) == 1 and result.members[0].epochs_run == 2
    assert report.get("deadline") is None  # nothing was cut short
    skipped = report["members_skipped"]
    assert (skipped["planned"], skipped["trained"]) == (3, 1)
    assert skipped["member_s"] >= 4.0 and skipped["left_s"] < skipped["member_s"]


def _paced_run(
    spec: TrainSpec, deadline_in: float, seconds: dict[str, float], epoch_seconds: dict[str, float] | None = None
) -> _Run:
    """A ``_Run`` that has trained members at these paces, without data (the pace check only)."""
    run = object.__new__(_Run)
    run.spec, run.deadline, run.member_seconds = spec, time.perf_counter() + deadline_in, seconds
    run.epoch_seconds = epoch_seconds or {}
    run.recipe_epochs = spec.epochs
    run.members_skipped = run.members_shortened = run.short_note = None
    run.log = lambda _m: None
    return run


def test_the_pace_check_uses_the_next_members_backbone(tiny_spec: Callable[..., TrainSpec]) -> None:
    mixed = tiny_spec(ensemble={"members": 3, "backbones": ["tf_efficientnet_lite0"]})
    # member 1 is lite0: its pace is unknown, so the slowest seen (5 s) counts, and 4 s are left
    assert _paced_run(mixed, 4.0, {"test_efficientnet": 5.0}).epochs_that_fit(1) is None
    # member 2 is test_efficientnet again: 1 s a member fits the 4 s left, whatever lite0 took
    assert _paced_run(mixed, 4.0, {"test_efficientnet": 1.0, "tf_efficientnet_lite0": 9.0}).epochs_that_fit(2) == 2
    # no member trained yet: nothing to judge by, never skipped
    assert _paced_run(mixed, 4.0, {}).epochs_that_fit(1) == 2


def test_a_member_that_fits_only_in_part_trains_a_shorter_schedule(tiny_spec: Callable[..., TrainSpec]) -> None:
    # A member of 8 epochs: 1 s of setup and 1.5 s an epoch (13 s; 14.3 s with the pace margin). The
    # planner set the epochs (keep: the user set none of the fields).
    spec = tiny_spec(epochs=8, ensemble={"members": 3}, keep=[])
    pace = ({"test_efficientnet": 13.0}, {"test_efficientnet": 1.5})
    run = _paced_run(spec, 10.0, *pace)
    # 10 s left: (10 / 1.1 - 1) / 1.5 = 5.4, so 5 epochs (at least half of 8 fit)
    assert run.epochs_that_fit(1) == 5
    assert run.members_skipped is None
    assert run.short_note is not None and "member 2 of 3 trains 5 of 8 epochs" in run.short_note
    # 7 s left: 3.6 epochs fit, under half of 8: not started
    run = _paced_run(spec, 7.0, *pace)
    assert run.epochs_that_fit(1) is None
    assert run.short_note is None and run.members_skipped is not None
    # the warm-up counts: with 3 warm-up epochs at least 5 must fit, and 4.6 do (8 s left)
    warm = tiny_spec(epochs=8, ensemble={"members": 3}, schedule={"name": "cosine", "warmup_epochs": 3}, keep=[])
    assert _paced_run(warm, 8.0, *pace).epochs_that_fit(1) is None
    assert _paced_run(spec, 8.0, *pace).epochs_that_fit(1) == 4
    # a whole member fits: the recipe's epochs
    assert _paced_run(spec, 15.0, *pace).epochs_that_fit(1) == 8
    # epochs the user set are kept (the member is not started), and so are schedules laid out by epoch
    # index, which fewer epochs would only cut off
    kept = tiny_spec(epochs=8, ensemble={"members": 3}, keep=["epochs"])
    assert _paced_run(kept, 10.0, *pace).epochs_that_fit(1) is None
    stepped = tiny_spec(epochs=8, ensemble={"members": 3}, keep=[], schedule={"name": "step", "warmup_epochs": 0})
    assert _paced_run(stepped, 10.0, *pace).epochs_that_fit(1) is None


def test_a_shortened_member_is_reported_only_once_it_joined(tiny_spec: Callable[..., TrainSpec]) -> None:
    run = _paced_run(tiny_spec(epochs=8, ensemble={"members": 3}, keep=[]), 10.0,
                     {"test_efficientnet": 13.0}, {"test_efficientnet": 1.5})
    run.members = [object()]
    assert run.epochs_that_fit(1) == 5
    run.note_shortened(1, 5)  # the deadline or cut_short left it out: nothing to report
    assert run.members_shortened is None and run.short_note is None
    assert run.epochs_that_fit(1) == 5
    run.members.append(object())
    run.note_shortened(1, 5)
    assert run.members_shortened == {"members": [{"member": 1, "epochs": 5}], "planned_epochs": 8,
                                     "note": run.members_shortened["note"]}
    assert run.members_shortened["note"].startswith("member 2 of 3 trains 5 of 8 epochs")


def _on_a_grid(t0: float, step: float) -> Callable[[object], None]:
    """An on_epoch hook that ends every epoch on the next multiple of ``step`` seconds after ``t0``."""

    def wait(_record: object) -> None:
        now = time.perf_counter() - t0
        time.sleep(math.floor(now / step + 1) * step - now)

    return wait


def test_a_shortened_member_trains_and_ends_before_the_deadline(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    # Epochs end on a 1.5 s grid, so the first member (4 epochs) ends at 6 s and takes about 6 s.
    # With the deadline at 10.3 s, about 4.3 s are left: a whole member (6.6 s with the margin) does
    # not fit, (4.3 / 1.1) / 1.5 = 2.6 epochs do: the second member trains 2 epochs, ends at 9 s,
    # and the third is not started. Before, the second was skipped and 4 s were left unused.
    torch.set_num_threads(1)
    small = ImageArray(lfw_data.images[np.r_[0:40, 100:140]], lfw_data.labels[np.r_[0:40, 100:140]],
                       list(lfw_data.classes))
    spec = tiny_spec(epochs=4, patience=None, ensemble={"members": 3}, keep=[])
    seen: list = []
    t0 = time.perf_counter()
    grid = _on_a_grid(t0, 1.5)

    def on_epoch(record: object) -> None:
        seen.append(record)
        grid(record)

    result = train(small, spec, device="cpu", hooks=TrainHooks(deadline=t0 + 10.3, on_epoch=on_epoch))
    report = result.report()
    assert [m.epochs_run for m in result.members] == [4, 2]
    assert report.get("deadline") is None  # nothing was cut short
    assert report["members_shortened"]["members"] == [{"member": 1, "epochs": 2}]
    assert (report["members_skipped"]["planned"], report["members_skipped"]["trained"]) == (3, 2)
    # Its schedule is a whole one of 2 epochs: its cosine lr ends where the 4-epoch one is at epoch 3.
    lrs = {(r.member, r.epoch): r.lr for r in seen}
    assert lrs[(1, 0)] == lrs[(0, 0)] and lrs[(1, 1)] == pytest.approx(lrs[(0, 2)])
    assert result.members[1].epochs_planned == 2
    # each epoch says its member's epochs (the job's progress shows "epoch 2/2", not "2/4")
    assert [(r.member, r.extra["epochs"]) for r in seen] == [(0, 4.0)] * 4 + [(1, 2.0)] * 2


def test_members_that_fit_before_the_deadline_all_train(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    torch.set_num_threads(1)
    spec = tiny_spec(epochs=2, patience=None, ensemble={"members": 3})
    t0 = time.perf_counter()
    result = train(lfw_data, spec, device="cpu", hooks=TrainHooks(deadline=t0 + 120, on_epoch=_slow_epochs(0.1)))
    report = result.report()
    assert len(result.members) == 3
    assert report.get("members_skipped") is None and report.get("deadline") is None
