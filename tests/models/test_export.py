"""Fidelity of exported graphs: every zoo backbone family, and an ensemble sharing a frozen prefix.

The exported ONNX graph (run by onnxruntime) and the TorchScript module (run by torch) must give the
service ``Predictor``'s probabilities within 1e-4 and the same top-1 on every image, at a batch size
other than the one traced. Random-init weights (``weights='none'``) at 32 px keep it quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import FIDELITY_ATOL, compare, run_exported
from models.export import EXPORT_FORMATS, export_format, write_onnx, write_torchscript
from models.onnx_runtime import OnnxEnsemble
from models.spec import BACKBONES, UnknownNameError
from tests.utils.exports import image_batch, random_predictor

# The same families as the fast ones, only bigger: they run with -m slow.
SLOW = {"tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet50", "efficientnet_b0"}
SIZE = 32


@pytest.fixture(autouse=True)
def _threads(two_torch_threads):
    """Every test here runs on two torch threads."""


def _check(predictor, tmp_path: Path) -> dict[str, dict]:
    images = image_batch(5, SIZE)  # the graph was traced at batch 2: the batch axis must be dynamic
    want = predictor.predict_proba_views([torch.from_numpy(images)])
    figures = {}
    for fmt, writer in (("onnx", write_onnx), ("torchscript", write_torchscript)):
        path = writer(predictor, tmp_path / export_format(fmt).file)
        got = run_exported(path, fmt, images.transpose(0, 3, 1, 2), threads=2)
        figures[fmt] = compare(want, got)
        assert figures[fmt]["max_abs_diff"] <= FIDELITY_ATOL, (fmt, figures[fmt])
        assert figures[fmt]["top1_agreement"] == 1.0, (fmt, figures[fmt])
    return figures


@pytest.mark.parametrize(
    "backbone", [pytest.param(b, marks=pytest.mark.slow) if b in SLOW else b for b in BACKBONES]
)
def test_every_backbone_exports_faithfully(backbone: str, tmp_path: Path) -> None:
    predictor = random_predictor([backbone], SIZE, temperature=0.7)
    print(backbone, _check(predictor, tmp_path))


def test_an_ensemble_sharing_a_frozen_prefix_exports_faithfully(tmp_path: Path) -> None:
    predictor = random_predictor(["test_efficientnet"] * 3, SIZE, shared_prefix=3, temperature=1.8)
    groups = predictor.model.shared_groups()
    assert groups[0][0] > 0 and groups[0][1] == [0, 1, 2]  # the prefix runs once in the graph too
    print("shared prefix", _check(predictor, tmp_path))


def test_members_of_mixed_families_with_their_own_normalisation(tmp_path: Path) -> None:
    # Lite0 uses mean = std = 0.5, ResNet ImageNet statistics: the graph re-normalises per member.
    predictor = random_predictor(["test_efficientnet", "resnet18", "vit_small_patch16_224"], SIZE)
    _check(predictor, tmp_path)


@pytest.mark.parametrize("tta", ["none", "hflip", "five_crop"])
def test_onnx_backend_averages_tta_views_like_torch(tta: str, tmp_path: Path) -> None:
    torch_predictor = random_predictor(["test_efficientnet"] * 2, SIZE, temperature=1.6)
    onnx_predictor = random_predictor(["test_efficientnet"] * 2, SIZE, temperature=1.6)
    onnx_predictor.use_onnx(OnnxEnsemble(write_onnx(onnx_predictor, tmp_path / "m.onnx"), threads=2))
    assert onnx_predictor.runtime == "onnxruntime" and torch_predictor.runtime == "torch"
    side = torch_predictor.input_side(tta)
    arrays = image_batch(7, side, seed=3)
    want = torch_predictor.predict_proba_views(torch_predictor.views_of_arrays(arrays, tta))
    got = onnx_predictor.predict_proba_views(onnx_predictor.views_of_arrays(arrays, tta))
    np.testing.assert_allclose(got, want, atol=FIDELITY_ATOL, rtol=0)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_unknown_format_names_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="onnx"):
        export_format("tflite")
    assert set(EXPORT_FORMATS) == {"onnx", "torchscript", "safetensors"}


def test_the_api_schema_names_the_same_formats_and_quantizations() -> None:
    from typing import get_args

    from models.export import QUANTIZATIONS
    from service.schemas import ExportFormatName, QuantizationName

    assert set(get_args(ExportFormatName)) == set(EXPORT_FORMATS)
    assert set(get_args(QuantizationName)) == set(QUANTIZATIONS)


def test_an_exported_model_checks_a_validation_set_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.runtime

    predictor = random_predictor(["test_efficientnet"], SIZE)
    images = image_batch(10, SIZE).transpose(0, 3, 1, 2)
    seen: list[int] = []  # images in each onnxruntime run
    for fmt, writer in (("onnx", write_onnx), ("torchscript", write_torchscript)):
        path = writer(predictor, tmp_path / export_format(fmt).file)
        whole = run_exported(path, fmt, images, threads=2)  # 10 images: one chunk either way
        monkeypatch.setattr(models.runtime, "ONNX_INFERENCE_BATCH", 4)
        monkeypatch.setattr(models.runtime, "CPU_INFERENCE_PIXELS", 4 * SIZE * SIZE)
        if fmt == "onnx":
            import models.onnx_runtime

            real = models.onnx_runtime.OnnxEnsemble

            class Counting(real):  # type: ignore[misc,valid-type]
                def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
                    super().__init__(*a, **kw)
                    run = self.session.run
                    self.session = type("S", (), {"run": staticmethod(
                        lambda names, feed: seen.append(len(feed["images"])) or run(names, feed))})()

            monkeypatch.setattr(models.onnx_runtime, "OnnxEnsemble", Counting)
        chunked = run_exported(path, fmt, images, threads=2)
        if fmt == "onnx":
            assert seen == [4, 4, 2]
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
        monkeypatch.undo()
