"""Export bundles of a trained model, and the onnxruntime predict runtime's cached graph."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models import bundle
from models.artifact import load_predictor, save_artifact
from models.bundle import CHECKSUMS_FILE, build_bundle
from models.data import ImageArray, stratified_split
from models.export import ExportError
from models.onnx_runtime import RUNTIME_DIR
from models.spec import TrainSpec
from models.training import train


@pytest.fixture(autouse=True)
def _threads(two_torch_threads):
    """Every test here runs on two torch threads."""


@pytest.fixture(scope="module")
def model_dir(lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec], tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    spec = tiny_spec(epochs=2, ensemble={"members": 2})
    return save_artifact(train(lfw_data, spec, device="cpu"), spec, tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def split(lfw_data: ImageArray, model_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec = json.loads((model_dir / "manifest.json").read_text())["spec"]
    tr, va = stratified_split(lfw_data.labels, spec["val_fraction"], spec["seed"])
    return lfw_data.images[va], lfw_data.labels[va], lfw_data.images[tr]


def _members(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_onnx_bundle_holds_a_checked_model_and_what_a_reader_needs(model_dir: Path, split, tmp_path: Path) -> None:
    val_x, val_y, _ = split
    record = build_bundle(model_dir, tmp_path / "b.zip", fmt="onnx", val_images=val_x, val_labels=val_y)
    files = _members(tmp_path / "b.zip")
    assert set(files) == {"model.onnx", "labels.json", "preprocess.json", "README.md", CHECKSUMS_FILE}
    sums = dict(reversed(line.split("  ")) for line in files[CHECKSUMS_FILE].decode().splitlines())
    assert set(sums) == set(files) - {CHECKSUMS_FILE}
    assert all(hashlib.sha256(files[n]).hexdigest() == h for n, h in sums.items())
    assert json.loads(files["labels.json"]) == load_predictor(model_dir).classes
    pre = json.loads(files["preprocess.json"])
    assert pre["image_size"] == 32 and pre["input"]["layout"] == "NCHW" and pre["input"]["dtype"] == "uint8"
    card = files["README.md"].decode()
    for section in ("## Data", "## Recipe", "## Validation", "Weakest classes", "## Intended use and limits",
                    "## Export", "onnxruntime as ort", "calibration: temperature"):
        assert section in card, section
    assert "import torch" not in card
    fid = record["fidelity"]
    assert fid["images"] == len(val_x) and fid["max_abs_diff"] <= 1e-4 and fid["top1_agreement"] == 1.0
    assert not list(tmp_path.glob(".*"))  # no temporary left beside the bundle


def test_int8_static_reports_its_accuracy_change_and_is_refused_past_the_limit(
    model_dir: Path, split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    val_x, val_y, train_x = split
    record = build_bundle(model_dir, tmp_path / "q.zip", fmt="onnx", quantization="int8_static",
                          val_images=val_x, val_labels=val_y, calibration=train_x)
    q = record["int8"]
    assert q["images"] == len(val_y) and 0 <= q["int8_top1"] <= 1
    assert q["delta_points"] == pytest.approx(100 * (q["int8_top1"] - q["fp32_top1"]))
    assert "int8 accuracy change" in _members(tmp_path / "q.zip")["README.md"].decode()
    # A limit no model meets: the export fails, naming the figure, and leaves no bundle.
    monkeypatch.setattr(bundle, "INT8_MAX_DROP_POINTS", -1000.0)
    with pytest.raises(ExportError, match=r"refused: int8_static drops validation top-1 by .* points"):
        build_bundle(model_dir, tmp_path / "r.zip", fmt="onnx", quantization="int8_static",
                     val_images=val_x, val_labels=val_y, calibration=train_x)
    assert not (tmp_path / "r.zip").exists() and not list(tmp_path.glob(".*"))


def test_quantization_is_for_onnx_and_needs_validation_labels(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="ONNX exports only"):
        build_bundle(model_dir, tmp_path / "x.zip", fmt="torchscript", quantization="int8_dynamic")
    with pytest.raises(ExportError, match="validation images"):
        build_bundle(model_dir, tmp_path / "x.zip", fmt="onnx", quantization="int8_dynamic")


def test_torchscript_and_safetensors_bundles(model_dir: Path, split, tmp_path: Path) -> None:
    val_x, val_y, _ = split
    record = build_bundle(model_dir, tmp_path / "t.zip", fmt="torchscript", val_images=val_x, val_labels=val_y)
    assert record["fidelity"]["max_abs_diff"] <= 1e-4
    files = _members(tmp_path / "t.zip")
    assert "model.pt" in files
    (tmp_path / "model.pt").write_bytes(files["model.pt"])
    module = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        probs, raw = module(torch.from_numpy(val_x).permute(0, 3, 1, 2).contiguous())
    want = load_predictor(model_dir).predict_proba_views([torch.from_numpy(val_x)])
    np.testing.assert_allclose(probs.numpy(), want, atol=1e-4, rtol=0)

    build_bundle(model_dir, tmp_path / "s.zip", fmt="safetensors")
    files = _members(tmp_path / "s.zip")
    assert files["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    assert "manifest.json" in files and "model.safetensors" in files[CHECKSUMS_FILE].decode()


def test_onnxruntime_runtime_caches_its_graph_by_content(model_dir: Path, split, tmp_path: Path) -> None:
    val_x, _, _ = split
    torch_p = load_predictor(model_dir, device="cpu")
    onnx_p = load_predictor(model_dir, device="cpu", runtime="onnxruntime", threads=2)
    assert onnx_p.runtime == "onnxruntime"
    cached = list((model_dir / RUNTIME_DIR).glob("ensemble-*.onnx"))
    assert len(cached) == 1
    for tta in ("none", "hflip", "five_crop"):
        side = torch_p.input_side(tta)
        arrays = np.stack([np.asarray(np.resize(x, (side, side, 3)), dtype=np.uint8) for x in val_x[:6]])
        np.testing.assert_allclose(
            onnx_p.predict_proba_views(onnx_p.views_of_arrays(arrays, tta)),
            torch_p.predict_proba_views(torch_p.views_of_arrays(arrays, tta)), atol=1e-5, rtol=0,
        )
    mtime = cached[0].stat().st_mtime_ns
    load_predictor(model_dir, device="cpu", runtime="onnxruntime")
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not exported again
    # A changed model (here: its temperature) gets a new graph; the stale one goes.
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["temperature"] = 3.0
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    p3 = load_predictor(model_dir, device="cpu", runtime="onnxruntime")
    now = list((model_dir / RUNTIME_DIR).glob("ensemble-*.onnx"))
    assert len(now) == 1 and now != cached
    want = load_predictor(model_dir, device="cpu").predict_proba_views([torch.from_numpy(val_x)])
    np.testing.assert_allclose(p3.predict_proba_views([torch.from_numpy(val_x)]), want, atol=1e-5, rtol=0)
