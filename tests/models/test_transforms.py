"""Normalisation shared by evaluation and prediction, per-image augmentation."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

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


def _ops(transform: object) -> list[object]:
    return list(getattr(transform, "transforms", [transform]))


def test_presets_fill_fields_and_explicit_fields_win() -> None:
    assert isinstance(augment_transform(AugmentSpec(preset="none"), PRE), v2.Identity)
    strong = [type(op) for op in _ops(augment_transform(AugmentSpec(preset="strong"), PRE))]
    assert v2.TrivialAugmentWide in strong and v2.RandomErasing in strong and v2.RandAugment not in strong
    override = AugmentSpec(preset="strong", auto_augment="randaugment", random_erasing=0.0)
    ops = [type(op) for op in _ops(augment_transform(override, PRE))]
    assert v2.RandAugment in ops and v2.TrivialAugmentWide not in ops and v2.RandomErasing not in ops
    on = AugmentSpec(preset="none", auto_augment="trivialaugment")
    assert [type(op) for op in _ops(augment_transform(on, PRE))] == [v2.TrivialAugmentWide]


@pytest.mark.parametrize("policy", typing.get_args(AugmentSpec.model_fields["auto_augment"].annotation))
def test_auto_augment_policies(policy: str) -> None:
    expected = {"none": None, "randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}[policy]
    transform = augment_transform(AugmentSpec(preset="none", auto_augment=policy), PRE)
    if expected is None:
        assert isinstance(transform, v2.Identity)
        return
    (op,) = _ops(transform)
    assert type(op) is expected
    if isinstance(op, v2.RandAugment):
        assert (op.num_ops, op.magnitude) == (2, 9)
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    out = augment_batch(batch, transform)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert sum(not torch.equal(o, b) for o, b in zip(out, batch, strict=True)) >= 4


def test_random_erasing_fills_a_rectangle_with_the_mean_colour() -> None:
    torch.manual_seed(0)
    pre = Preprocess(PRE.mean, PRE.std, PRE.interpolation, 32)
    transform = augment_transform(AugmentSpec(preset="none", random_erasing=1.0), pre)
    mean_colour = torch.tensor([round(255 * m) for m in pre.mean], dtype=torch.uint8)
    for _ in range(10):
        img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
        out = transform(img)
        assert out.shape == img.shape and out.dtype == torch.uint8
        rows, cols = (out != img).any(dim=0).nonzero(as_tuple=True)
        assert len(rows) >= 0.02 * 32 * 32 * 0.8
        box = out[:, int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1]
        assert (box == mean_colour[:, None, None]).all(), "the changed pixels are not one filled rectangle"
    # The fill normalises to zero: the erased region carries no signal after normalisation.
    assert normalize_batch(mean_colour.view(1, 1, 1, 3), pre).abs().max() <= 0.5 / 255 / min(pre.std) + 1e-6


def test_random_erasing_probability() -> None:
    torch.manual_seed(0)
    transform = augment_transform(AugmentSpec(preset="none", random_erasing=0.25), PRE)
    batch = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8)
    erased = sum(not torch.equal(o, b) for o, b in zip(augment_batch(batch, transform), batch, strict=True))
    assert 25 <= erased <= 75
