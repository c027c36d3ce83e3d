"""train(): callbacks, best weights, early stopping, cancellation, errors (tiny network on LFW)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import member as member_setup
from models.data import ImageArray, stratified_split
from models.errors import TrainingCancelled, TrainingError
from models.heads import create_classifier
from models.optim import lr_at_epochs
from models.spec import EpochRecord
from models.training import TrainHooks, train
from models.transforms import normalize_batch


def _val_acc(member_model: torch.nn.Module, data: ImageArray, val_idx: np.ndarray, pre) -> float:
    with torch.inference_mode():
        logits = member_model(normalize_batch(data.images[val_idx], pre))
    return float((logits.argmax(dim=1).numpy() == data.labels[val_idx]).mean())


def test_train_runs_reports_every_epoch_and_keeps_best_weights(lfw_data: ImageArray, tiny_spec) -> None:
    spec = tiny_spec(epochs=4, schedule={"name": "cosine", "warmup_epochs": 1}, ensemble={"members": 2})
    seen: list[EpochRecord] = []
    lines: list[str] = []
    result = train(lfw_data, spec, device="cpu", hooks=TrainHooks(on_epoch=seen.append, log=lines.append))

    assert [(r.member, r.epoch) for r in seen] == [(m, e) for m in (0, 1) for e in range(4)]
    assert result.history == seen
    assert [r.lr for r in seen[:4]] == pytest.approx(lr_at_epochs(spec.schedule, 4, spec.optimizer.lr))
    for r in seen:
        assert 0.0 <= r.train_acc <= 1.0 and 0.0 <= r.val_acc <= 1.0 and r.seconds > 0
        assert np.isfinite(r.train_loss) and np.isfinite(r.val_loss)
    assert lines and any("epoch 4/4" in line for line in lines)

    _, val_idx = stratified_split(lfw_data.labels, spec.val_fraction, spec.seed)
    assert result.val_size == len(val_idx) == 40 and result.train_size == 160
    assert result.split_counts == {"face": [80, 20], "not_face": [80, 20]}
    for i, member in enumerate(result.members):
        records = [r for r in seen if r.member == i]
        best = max(records, key=lambda r: (r.val_acc, -r.val_loss))
        assert member.best_epoch == best.epoch and member.val_acc == best.val_acc
        assert member.seed == spec.seed + i
        assert all(t.device.type == "cpu" for t in member.state_dict.values())
        # The kept weights really are the best epoch's: re-evaluate them from scratch.
        assert _val_acc(member.build(), lfw_data, val_idx, member.preprocess) == pytest.approx(member.val_acc)
    assert result.member_val_acc == [m.val_acc for m in result.members]
    assert result.val_acc > 0.6

    report = result.report()
    json.dumps(report, allow_nan=False)
    assert report["device"] == "cpu" and report["num_classes"] == 2 and len(report["members"]) == 2
    assert report["members"][0]["trainable_params"] == report["members"][0]["total_params"]


def test_ensemble_metrics_average_member_probabilities(lfw_data: ImageArray, tiny_spec) -> None:
    spec = tiny_spec(epochs=1, ensemble={"members": 2})
    result = train(lfw_data, spec, device="cpu")
    _, val_idx = stratified_split(lfw_data.labels, spec.val_fraction, spec.seed)
    with torch.inference_mode():
        probs = result.build_ensemble()(normalize_batch(lfw_data.images[val_idx], result.preprocess))
    acc = float((probs.argmax(dim=1).numpy() == lfw_data.labels[val_idx]).mean())
    assert result.val_acc == pytest.approx(acc)
    y = torch.from_numpy(lfw_data.labels[val_idx])
    assert result.val_loss == pytest.approx(float(-probs[torch.arange(len(y)), y].log().mean()), rel=1e-4)


# With the cache on, the frozen layers never see a batch; "off" runs them on every training batch.
@pytest.mark.parametrize("cache", ["auto", "off"])
def test_frozen_part_keeps_its_batchnorm_statistics(lfw_data: ImageArray, tiny_spec, cache: str) -> None:
    spec = tiny_spec(epochs=1, freeze={"mode": "first_n", "stages": 2}, cache={"mode": cache})
    result = train(lfw_data, spec, device="cpu")
    assert result.applied["members"][0]["cache"]["path"] == {"auto": "memory", "off": "off"}[cache]
    sd = result.members[0].state_dict
    # Random init starts BatchNorm at mean 0 / var 1; only the unfrozen layers may move.
    assert torch.all(sd["bn1.running_mean"] == 0) and torch.all(sd["bn1.running_var"] == 1)
    assert not torch.all(sd["bn2.running_mean"] == 0)
    assert result.members[0].freeze["frozen_groups"] == ["conv_stem+bn1", "blocks.0"]


def test_frozen_layers_run_in_eval_mode_when_the_cache_is_off(
    lfw_data: ImageArray, tiny_spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the cache the frozen prefix runs on every training batch; it must run in eval mode
    # (BatchNorm statistics fixed, no dropout or drop-path), while the layers that train run in train mode.
    ran_training: set[str] = set()

    def spy(*args: object, **kwargs: object) -> torch.nn.Module:
        model = create_classifier(*args, **kwargs)
        for name, module in model.named_modules():
            if name:
                module.register_forward_pre_hook(
                    lambda m, _, name=name: ran_training.add(name) if m.training else None
                )
        return model

    monkeypatch.setattr(member_setup, "create_classifier", spy)
    spec = tiny_spec(epochs=1, freeze={"mode": "first_n", "stages": 2}, cache={"mode": "off"})
    result = train(lfw_data, spec, device="cpu")
    assert result.applied["members"][0]["cache"]["path"] == "off"
    assert result.members[0].freeze["frozen_groups"] == ["conv_stem+bn1", "blocks.0"]
    in_frozen = ("conv_stem", "bn1", "blocks.0")
    frozen = sorted(n for n in ran_training if any(n == g or n.startswith(g + ".") for g in in_frozen))
    assert frozen == [], f"frozen layers ran in train mode: {frozen}"
    assert {"blocks.1", "bn2", "classifier"} <= ran_training, sorted(ran_training)


def test_early_stopping_with_patience(lfw_data: ImageArray, tiny_spec) -> None:
    # A learning rate far below float32 resolution, frozen BatchNorm and no dropout: the model
    # cannot change, so validation never improves after the first epoch.
    spec = tiny_spec(
        epochs=8,
        patience=2,
        head_dropout=0.0,
        freeze={"mode": "linear_probe"},
        optimizer={"name": "sgd", "lr": 1e-20, "weight_decay": 0.0},
        schedule={"name": "constant", "warmup_epochs": 0},
    )
    seen: list[EpochRecord] = []
    result = train(lfw_data, spec, device="cpu", hooks=TrainHooks(on_epoch=seen.append))
    assert [r.epoch for r in seen] == [0, 1, 2]
    member = result.members[0]
    assert member.best_epoch == 0 and member.epochs_run == 3 and member.stopped_early


def test_should_stop_cancels_between_batches(lfw_data: ImageArray, tiny_spec) -> None:
    calls = {"n": 0}

    def stop_after_a_few() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    seen: list[EpochRecord] = []
    with pytest.raises(TrainingCancelled):
        hooks = TrainHooks(on_epoch=seen.append, should_stop=stop_after_a_few)
        train(lfw_data, tiny_spec(epochs=3), device="cpu", hooks=hooks)
    assert seen == []  # stopped inside the first epoch (5 batches of 32)


def test_should_stop_before_start(lfw_data: ImageArray, tiny_spec) -> None:
    with pytest.raises(TrainingCancelled):
        train(lfw_data, tiny_spec(), device="cpu", hooks=TrainHooks(should_stop=lambda: True))


def test_class_with_one_image_is_a_training_error(lfw_data: ImageArray, tiny_spec) -> None:
    keep = np.r_[0:100, 150]
    data = ImageArray(images=lfw_data.images[keep], labels=lfw_data.labels[keep], classes=lfw_data.classes)
    with pytest.raises(TrainingError, match="'not_face' \\(1\\)"):
        train(data, tiny_spec(), device="cpu")
    single = ImageArray(images=lfw_data.images[:10], labels=np.zeros(10, dtype=np.int64), classes=["face"])
    with pytest.raises(TrainingError, match="at least 2 classes"):
        train(single, tiny_spec(), device="cpu")


def test_images_at_the_wrong_size_are_refused(lfw_data: ImageArray, tiny_spec) -> None:
    with pytest.raises(ValueError, match="64 px"):
        train(lfw_data, tiny_spec(image_size=64), device="cpu")


def test_the_report_keeps_each_validation_prediction_highest_loss_first(
    lfw_data: ImageArray, lfw_root, tiny_spec
) -> None:
    """fastai's top losses: per val image its file, true and predicted class, confidence and loss."""
    from models.report import Report
    from models.results import val_predictions

    result = train(lfw_data, tiny_spec(epochs=1), device="cpu")
    report = result.evaluation_report()
    preds = report.val_predictions
    assert preds is not None and len(preds) == result.val_size == 40
    _, val_idx = stratified_split(lfw_data.labels, 0.2, tiny_spec().seed)
    assert sorted(p.file for p in preds) == sorted(lfw_data.names[i] for i in val_idx)
    assert all((lfw_root / p.file).is_file() for p in preds if p.file)
    losses = [p.loss for p in preds]
    assert losses == sorted(losses, reverse=True)
    wrong = sum(p.label != p.predicted for p in preds)
    assert wrong == round((1 - result.val_acc) * 40)
    for p in preds:
        assert p.label in lfw_data.classes and 0.5 <= p.confidence <= 1.0
    # a report stored before the field existed still loads
    old = report.model_dump(mode="json")
    del old["val_predictions"]
    assert Report.model_validate(old).val_predictions is None
    # capped: only the highest losses are kept
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    kept = val_predictions(probs, np.array([0, 0, 1]), ["a", "b"], ["a/1", "a/2", "b/3"], limit=2)
    assert [k["file"] for k in kept] == ["a/2", "b/3"] and kept[0]["predicted"] == "b"
    assert kept[0]["confidence"] == 0.8 and kept[0]["loss"] == pytest.approx(-np.log(0.2), abs=1e-4)
