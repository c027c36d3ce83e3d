"""Saved models: safetensors + manifest, atomic save, predictions identical to training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from models import artifact
from models.artifact import ArtifactError, load_predictor, save_artifact
from models.data import ImageArray, open_image
from models.evaluation import scale_probs
from models.results import TrainResult
from models.spec import TrainSpec
from models.training import train
from models.transforms import normalize_batch


@pytest.fixture(scope="module")
def trained(lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]) -> tuple[TrainResult, TrainSpec]:
    spec = tiny_spec(epochs=1, ensemble={"members": 2})
    return train(lfw_data, spec, device="cpu"), spec


def _ensemble_probs(result: TrainResult, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return result.build_ensemble()(normalize_batch(images, result.preprocess)).numpy()


def test_round_trip_predicts_like_the_trained_ensemble(trained, lfw_root: Path, lfw_data, tmp_path: Path) -> None:
    result, spec = trained
    dest = save_artifact(result, spec, tmp_path / "models" / "job-1")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model.safetensors"]
    assert not list(dest.parent.glob(".*")), "temporary folders left behind"

    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["classes"] == ["face", "not_face"]
    assert [m["backbone"] for m in manifest["members"]] == ["test_efficientnet"] * 2
    assert [m["seed"] for m in manifest["members"]] == [0, 1]
    assert manifest["preprocess"] == result.preprocess.to_dict()
    assert manifest["spec"]["ensemble"]["members"] == 2
    assert manifest["metrics"]["val_acc"] == result.val_acc
    keys = safetensors.torch.load_file(str(dest / "model.safetensors")).keys()
    assert {k.split(".")[1] for k in keys} == {"0", "1"} and all(k.startswith("members.") for k in keys)

    predictor = load_predictor(dest, device="cpu")
    assert predictor.classes == ["face", "not_face"] and predictor.preprocess == result.preprocess
    assert not predictor.model.training

    # Prediction from the original files preprocesses exactly like the training cache did.
    files = [lfw_root / name for name in lfw_data.names[95:105]]
    images = [open_image(p, p.name) for p in files]
    proba = predictor.predict_proba(images)
    assert proba.shape == (10, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-6)
    # ...and the fitted temperature is applied to the averaged probabilities.
    expected = scale_probs(_ensemble_probs(result, lfw_data.images[95:105]), result.temperature)
    assert np.allclose(proba, expected, atol=1e-6)


def test_predict_top_k(trained, tmp_path: Path) -> None:
    result, spec = trained
    predictor = load_predictor(save_artifact(result, spec, tmp_path / "m"))
    images = [Image.new("L", (40, 30), 128), Image.new("RGBA", (10, 50), (0, 0, 0, 0))]
    top = predictor.predict(images, top_k=5)
    proba = predictor.predict_proba(images)
    assert [len(t) for t in top] == [2, 2]  # capped at the number of classes
    for row, preds in zip(proba, top, strict=True):
        assert [p for _, p in preds] == sorted(row.tolist(), reverse=True)
        assert {c for c, _ in preds} == {"face", "not_face"}
    assert len(predictor.predict(images, top_k=1)[0]) == 1
    with pytest.raises(ValueError):
        predictor.predict(images, top_k=0)
    assert predictor.predict_proba([]).shape == (0, 2)


def test_no_pickle_anywhere(trained, tmp_path: Path) -> None:
    result, spec = trained
    dest = save_artifact(result, spec, tmp_path / "m")
    assert not [p for p in dest.rglob("*") if p.suffix in {".pt", ".pth", ".pkl", ".pickle", ".bin"}]
    raw = (dest / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length + JSON header
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "zoofit-model"


def test_failed_save_leaves_no_model(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, spec = trained

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "manifest_for", crash)  # after the weights were written
    dest = tmp_path / "models" / "job-2"
    with pytest.raises(OSError, match="disk full"):
        save_artifact(result, spec, dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_failed_overwrite_keeps_the_old_model(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, spec = trained
    dest = save_artifact(result, spec, tmp_path / "m")
    before = (dest / "model.safetensors").read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("x")

    monkeypatch.setattr(artifact.safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_artifact(result, spec, dest)
    assert (dest / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwrite_replaces_and_can_be_refused(trained, tmp_path: Path) -> None:
    result, spec = trained
    dest = save_artifact(result, spec, tmp_path / "m")
    (dest / "stale.txt").write_text("old")
    save_artifact(result, spec, dest)
    assert not (dest / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(FileExistsError):
        save_artifact(result, spec, dest, overwrite=False)


def test_load_refuses_what_is_not_a_model(tmp_path: Path, trained) -> None:
    with pytest.raises(ArtifactError):
        load_predictor(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtifactError, match="not a zoofit-model"):
        load_predictor(tmp_path)
    result, spec = trained
    dest = save_artifact(result, spec, tmp_path / "m")
    (dest / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ArtifactError, match="weights"):
        load_predictor(dest)
