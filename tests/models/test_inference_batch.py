"""Inference passes run in chunks sized for the device (``models.runtime.inference_batch``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import models.prefix
import models.runtime
import models.training
from models.artifact import load_predictor, save_artifact
from models.data import ImageArray
from models.runtime import GPU_INFERENCE_BATCH, ONNX_INFERENCE_BATCH, inference_batch
from models.spec import TrainSpec
from models.training import train

CHUNK = 8


def test_a_cpu_takes_fewer_images_the_larger_they_are() -> None:
    cpu = torch.device("cpu")
    assert inference_batch(cpu, 96) == 16
    assert inference_batch(cpu, 224) == 3
    assert inference_batch(cpu, 32) == GPU_INFERENCE_BATCH  # never more than a GPU's
    assert inference_batch(cpu, 4000) == 1
    assert inference_batch(torch.device("cuda"), 224) == GPU_INFERENCE_BATCH
    assert inference_batch(cpu, 224, "onnxruntime") == ONNX_INFERENCE_BATCH  # it plans its own memory


@pytest.fixture
def chunk_of_eight(monkeypatch: pytest.MonkeyPatch, tiny_spec: Callable[..., TrainSpec]) -> None:
    size = tiny_spec().image_size
    assert size is not None
    monkeypatch.setattr(models.runtime, "CPU_INFERENCE_PIXELS", CHUNK * size * size)


def _record_inference(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every forward pass through the model's steps that computes no gradients."""
    seen: list[int] = []
    real = models.prefix.forward_steps

    def recording(steps: Any, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            seen.append(int(x.shape[0]))
        return real(steps, x, start, end)

    monkeypatch.setattr(models.prefix, "forward_steps", recording)
    monkeypatch.setattr(models.training, "forward_steps", recording)
    return seen


def test_training_builds_its_cache_and_validates_in_chunks(
    chunk_of_eight: None, monkeypatch: pytest.MonkeyPatch, lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    seen = _record_inference(monkeypatch)
    spec = tiny_spec(freeze={"mode": "first_n", "stages": 3}, epochs=2)
    result = train(lfw_data, spec, device="cpu", num_threads=1)
    assert result.applied["members"][0]["cache"]["path"] == "memory"
    views = spec.cache.views if spec.augment.enabled else 1
    # the cache (each view of 160 training images, 40 validation images) and two validation passes, in
    # chunks of 8 (and one image that tells the cache its feature shape)
    assert seen[0] == 1 and max(seen) == CHUNK
    assert sum(seen[1:]) == 160 * views + 40 + 2 * 40


def test_predict_runs_in_chunks_and_gives_what_one_pass_gives(
    monkeypatch: pytest.MonkeyPatch, lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec], tmp_path: Path
) -> None:
    spec = tiny_spec(epochs=1)
    predictor = load_predictor(save_artifact(train(lfw_data, spec, device="cpu", num_threads=1), spec,
                                             tmp_path / "m"), device="cpu")
    seen: list[int] = []
    predictor.model.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    views = [torch.from_numpy(lfw_data.images[:40])]
    whole = predictor.predict_proba_views(views)  # 32 px: one pass of 40
    assert seen == [40]
    seen.clear()
    monkeypatch.setattr(models.runtime, "CPU_INFERENCE_PIXELS", CHUNK * 32 * 32)
    chunked = predictor.predict_proba_views(views)
    assert seen == [CHUNK] * 5
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
