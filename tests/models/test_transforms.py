"""Normalisation shared by evaluation and prediction, per-image augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.spec import AugmentSpec
from models.transforms import augment_batch, augment_transform, normalize_batch, train_transform
from models.zoo import Preprocess

PRE = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), interpolation="bicubic", image_size=16)


def test_normalize_batch_numpy_and_tensor_agree() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = normalize_batch(x, PRE)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    expected = (x.astype(np.float32) / 255.0 - np.array(PRE.mean)) / np.array(PRE.std)
    assert np.allclose(out.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6)
    assert torch.equal(normalize_batch(torch.from_numpy(x), PRE), out)


def test_normalize_batch_rejects_floats_and_nchw() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(np.zeros((1, 16, 16, 3), dtype=np.float32), PRE)
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(np.zeros((1, 3, 16, 16), dtype=np.uint8), PRE)


def test_augmentation_draws_per_image_and_keeps_size() -> None:
    torch.manual_seed(0)
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).permute(2, 0, 1)
    batch = img.expand(8, -1, -1, -1).contiguous()
    out = augment_batch(batch, augment_transform(AugmentSpec(crop_scale_min=0.3), PRE))
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.uint8
    assert len({o.numpy().tobytes() for o in out}) > 1, "every image got the same augmentation"


def test_disabled_augmentation_is_identity_and_train_transform_normalizes() -> None:
    off = AugmentSpec(random_resized_crop=False, hflip=False, color_jitter=0.0)
    batch = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(augment_batch(batch, augment_transform(off, PRE)), batch)
    single = train_transform(off, PRE)(batch[0])
    assert torch.allclose(single, normalize_batch(batch.permute(0, 2, 3, 1), PRE)[0])
