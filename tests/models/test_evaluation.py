"""The evaluation report: metrics against hand-computed examples, temperature scaling, TTA."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import evaluation as ev
from models.artifact import TTA_MODES, ArtifactError, load_predictor, save_artifact
from models.data import ImageArray
from models.plots import FIGURES, ReportMissingError, cached_figure, render_figure
from models.results import TrainResult
from models.spec import EpochRecord, TrainSpec, UnknownNameError
from models.training import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- metrics by hand


def test_confusion_and_per_class_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    cm = ev.confusion_matrix(y, pred, 4)  # class 3: never seen, never predicted
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    m = ev.per_class_metrics(cm)
    # precision = tp / times predicted: 2/2, 1/2, 1/2 (class 2 is predicted for a 1 and a 2), 0
    assert m["precision"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert m["recall"] == pytest.approx([2 / 3, 0.5, 1.0, 0.0])
    # F1 = 2PR / (P + R): 2 * 1 * 2/3 / (5/3) = 0.8; 0.5; 2 * 0.5 * 1 / 1.5 = 2/3; undefined -> 0
    assert m["f1"] == pytest.approx([0.8, 0.5, 2 / 3, 0.0])
    assert m["support"].tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError):
        ev.confusion_matrix(y, pred, 2)


def test_classification_report_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    y = np.array([1, 1, 2, 2])
    r = ev.classification_report(probs, y, ["a", "b", "c"], top_k=(1, 2, 3, 5))
    json.dumps(r, allow_nan=False)
    assert r["size"] == 4 and r["accuracy"] == pytest.approx(0.5)
    # top-2: row 0 (b second) is right, row 2 (c last) is not; k >= C (always 1) is left out
    assert r["top_k_acc"] == pytest.approx({"1": 0.5, "2": 0.75})
    assert r["confusion"] == [[0, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert [c["support"] for c in r["per_class"]] == [0, 2, 2]
    assert [c["precision"] for c in r["per_class"]] == pytest.approx([0.0, 1.0, 1.0])
    assert [c["recall"] for c in r["per_class"]] == pytest.approx([0.0, 0.5, 0.5])
    assert r["macro_avg"]["recall"] == pytest.approx(1 / 3)
    assert r["weighted_avg"]["recall"] == pytest.approx(0.5)


def test_top_k_accuracy_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    y = np.array([1, 1, 2])
    assert [ev.top_k_accuracy(probs, y, k) for k in (1, 2, 3, 10)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    # a tie is broken by class index: class 0 ranks first, so label 1 is not top-1
    assert ev.top_k_accuracy(np.array([[0.5, 0.5, 0.0]]), np.array([1]), 1) == 0.0
    with pytest.raises(ValueError):
        ev.top_k_accuracy(probs, y, 0)


def test_ece_and_nll_by_hand() -> None:
    # confidences 0.9 (right), 0.9 (wrong), 0.65 (right), 0.65 (right)
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.65, 0.35], [0.35, 0.65]])
    y = np.array([0, 0, 0, 1])
    r = ev.reliability(probs, y, n_bins=15)
    assert np.flatnonzero(r["count"]).tolist() == [9, 13]  # (0.6, 0.667] and (0.867, 0.933]
    assert r["accuracy"][[9, 13]] == pytest.approx([1.0, 0.5])
    assert r["confidence"][[9, 13]] == pytest.approx([0.65, 0.9])
    assert np.isnan(r["accuracy"][0])
    # 2/4 * |1 - 0.65| + 2/4 * |0.5 - 0.9|
    assert ev.expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.35 + 0.5 * 0.4)
    # calibrated: 3 of 4 right at confidence 0.75
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert ev.expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    # a confidence on a bin edge goes to the bin below: (lo, hi]; 1.0 goes to the last bin
    edge = ev.reliability(np.array([[1.0, 0.0], [0.2, 0.8]]), np.array([0, 1]), n_bins=5)
    assert edge["count"].tolist() == [0, 0, 0, 1, 1]
    nll = ev.negative_log_likelihood(np.array([[0.5, 0.5], [0.25, 0.75]]), np.array([0, 1]))
    assert nll == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)


# --------------------------------------------------------------------------- temperature scaling


def _calibrated_logits(n: int = 4000, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, c))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z, y


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_temperature_scaling_fixes_an_over_confident_model() -> None:
    z, y = _calibrated_logits()
    over = _softmax(5 * z).astype(np.float32)  # logits scaled by 5: far too sure of itself
    t = ev.fit_temperature(np.log(np.clip(over, ev.PROB_FLOOR, None)), y)
    assert t > 1 and t == pytest.approx(5.0, rel=0.1)
    after = ev.scale_probs(over, t)
    assert ev.negative_log_likelihood(after, y) < ev.negative_log_likelihood(over, y) - 0.1
    assert (after.argmax(1) == over.argmax(1)).all()
    cal = ev.calibration_report(over, y)
    json.dumps(cal, allow_nan=False)
    assert cal["temperature"] == pytest.approx(t) and len(cal["before"]["reliability"]) == ev.N_BINS
    assert cal["after"]["nll"] < cal["before"]["nll"]
    assert cal["after"]["ece"] < cal["before"]["ece"] / 3
    assert sum(b["count"] for b in cal["after"]["reliability"]) == len(y)


def test_temperature_of_a_calibrated_model_stays_near_one_and_is_clamped() -> None:
    z, y = _calibrated_logits(seed=1)
    assert ev.fit_temperature(z, y) == pytest.approx(1.0, abs=0.1)
    under = _softmax(z / 3)  # under-confident (an averaged ensemble tends this way): T < 1
    assert ev.fit_temperature(np.log(under), y) == pytest.approx(1 / 3, rel=0.15)
    # every validation image right: the NLL keeps falling as T -> 0; the lower bound holds
    assert ev.fit_temperature(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([0, 1])) == ev.TEMPERATURE_BOUNDS[0]


def test_scale_probs_is_p_to_the_one_over_t() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    assert ev.scale_probs(p, 1.0) is p
    expect = p**0.5 / (p**0.5).sum(1, keepdims=True)
    assert ev.scale_probs(p, 2.0) == pytest.approx(expect)
    import torch

    assert ev.scale_probs_torch(torch.tensor(p), 2.0).numpy() == pytest.approx(expect)


def test_training_curves_per_member_in_epoch_order() -> None:
    def rec(member: int, epoch: int, loss: float) -> EpochRecord:
        return EpochRecord(member, epoch, loss, 0.5, loss + 1, 0.4, 0.1 / (epoch + 1), 1.0)

    history = [rec(0, 0, 3.0), rec(0, 1, 2.0), rec(1, 0, 5.0), rec(0, 1, 1.5), rec(1, 1, float("nan"))]
    curves = ev.training_curves(history, [1, 0])
    assert [c["member"] for c in curves] == [0, 1] and [c["best_epoch"] for c in curves] == [1, 0]
    assert curves[0]["epoch"] == [0, 1] and curves[0]["train_loss"] == [3.0, 1.5]  # repeated epoch: last wins
    assert curves[0]["lr"] == pytest.approx([0.1, 0.05])
    assert curves[1]["train_loss"] == [5.0, None]  # not finite -> null


# --------------------------------------------------------------------------- the report of a real run


@pytest.fixture(scope="module")
def trained(lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]) -> tuple[TrainResult, TrainSpec]:
    spec = tiny_spec(epochs=2, ensemble={"members": 2})
    return train(lfw_data, spec, device="cpu"), spec


def test_train_reports_metrics_calibration_and_curves(trained) -> None:
    result, spec = trained
    report = result.report()
    json.dumps(report, allow_nan=False)
    e = report["evaluation"]
    assert e["size"] == result.val_size == sum(c["support"] for c in e["per_class"])
    assert sum(map(sum, e["confusion"])) == result.val_size
    assert e["accuracy"] == pytest.approx(result.val_acc) and e["top_k_acc"]["1"] == pytest.approx(result.val_acc)
    assert [c["support"] for c in e["per_class"]] == [v for _, v in result.split_counts.values()]
    cal = report["calibration"]
    lo, hi = ev.TEMPERATURE_BOUNDS
    assert lo <= report["temperature"] == cal["temperature"] == result.temperature <= hi
    assert cal["before"]["nll"] == pytest.approx(result.val_loss, rel=1e-6)
    assert cal["after"]["nll"] <= cal["before"]["nll"] + 1e-9  # the fit minimises exactly this
    assert [len(c["epoch"]) for c in report["curves"]] == [spec.epochs] * 2
    assert [c["best_epoch"] for c in report["curves"]] == [m.best_epoch for m in result.members]


def test_figures_render_as_png(trained, tmp_path: Path) -> None:
    report = trained[0].report()
    for name in FIGURES:
        if name == "lr_finder":  # drawn only for a job whose lr was "auto" (tests/models/test_lr_finder.py)
            with pytest.raises(ReportMissingError):
                render_figure(name, report)
            continue
        png = render_figure(name, report)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    with pytest.raises(UnknownNameError, match="confusion, curves, lr_finder, reliability"):
        render_figure("pie", report)
    first = cached_figure(tmp_path, "confusion", report)
    assert (tmp_path / "report" / "confusion.png").read_bytes() == first
    (tmp_path / "report" / "confusion.png").write_bytes(PNG_SIGNATURE + b"cached")
    assert cached_figure(tmp_path, "confusion", report) == PNG_SIGNATURE + b"cached"


# --------------------------------------------------------------------------- prediction: temperature and TTA


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    result, spec = trained
    return save_artifact(result, spec, tmp_path_factory.mktemp("models") / "m")


def _set_temperature(src: Path, dest: Path, t: object) -> Path:
    import shutil

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["temperature"] = t
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]


def test_manifest_stores_report_and_temperature(trained, saved: Path) -> None:
    result, _ = trained
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["temperature"] == result.temperature
    assert manifest["report"]["evaluation"]["confusion"] == result.evaluation["confusion"]
    assert load_predictor(saved, device="cpu").temperature == result.temperature


def test_predictor_applies_the_temperature(saved: Path, tmp_path: Path) -> None:
    images = _images()
    p1 = load_predictor(_set_temperature(saved, tmp_path / "t1", 1.0), device="cpu").predict_proba(images)
    p3 = load_predictor(_set_temperature(saved, tmp_path / "t3", 3.0), device="cpu").predict_proba(images)
    expect = p1 ** (1 / 3) / (p1 ** (1 / 3)).sum(1, keepdims=True)
    assert p3 == pytest.approx(expect, abs=1e-5)
    assert (p3.argmax(1) == p1.argmax(1)).all() and (p3.max(1) < p1.max(1)).all()
    assert np.allclose(p3.sum(1), 1, atol=1e-5)
    with pytest.raises(ArtifactError, match="temperature"):
        load_predictor(_set_temperature(saved, tmp_path / "bad", -1), device="cpu")


def test_tta_hflip_and_five_crop(saved: Path) -> None:
    predictor = load_predictor(saved, device="cpu")
    size = predictor.preprocess.image_size
    half = np.random.default_rng(1).integers(0, 256, (size, size // 2, 3), dtype=np.uint8)
    mirror = Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))  # left-right symmetric
    ramp = np.repeat(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None], size, axis=0)
    lopsided = Image.fromarray(np.repeat(ramp, 3, axis=2))  # dark left, bright right
    flat = Image.new("RGB", (size + 9, size), (90, 160, 30))  # every crop looks the same
    images = [mirror, lopsided, flat]

    none = predictor.predict_proba(images)
    hflip = predictor.predict_proba(images, tta="hflip")
    five = predictor.predict_proba(images, tta="five_crop")
    for p in (none, hflip, five):
        assert p.shape == (3, 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert hflip[0] == pytest.approx(none[0], abs=1e-6)
    assert not np.allclose(hflip[1], none[1], atol=1e-4)
    assert five[2] == pytest.approx(none[2], abs=1e-6)
    assert not np.allclose(five[1], none[1], atol=1e-4)
    views = predictor.views([lopsided], "five_crop")
    assert len(views) == 5 and all(tuple(v.shape) == (1, size, size, 3) for v in views)
    assert [len(r) for r in predictor.predict(images, top_k=1, tta="five_crop")] == [1, 1, 1]
    with pytest.raises(UnknownNameError, match="five_crop, hflip, none"):
        predictor.predict_proba(images, tta="bogus")
    assert set(TTA_MODES) == {"none", "hflip", "five_crop"}
