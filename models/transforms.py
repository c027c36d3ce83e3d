"""Tensor transforms (torchvision ``transforms.v2``) on uint8 images.

The decoded arrays are already resized and center-cropped to the model size, so evaluation
and prediction only normalise (``normalize_batch``). Training augments each uint8 image
(``augment_transform``), then normalises with the very same ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from .spec import AugmentSpec
from .zoo import Preprocess


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision interpolation for a name such as ``bicubic``."""
    try:
        return InterpolationMode(name)
    except ValueError:
        valid = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"unknown interpolation {name!r}; valid: {valid}") from None


def normalize_transform(preprocess: Preprocess) -> v2.Compose:
    """uint8 CHW/NCHW tensor to float32, scaled to 0..1, then normalised with the backbone's mean/std."""
    return v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
        ]
    )


def augment_transform(augment: AugmentSpec, preprocess: Preprocess) -> v2.Transform:
    """Random augmentation of one uint8 CHW image tensor, output uint8 CHW at the model size.

    In order, each only when enabled: RandomResizedCrop (scale ``(crop_scale_min, 1)``),
    RandomHorizontalFlip, RandAugment (2 ops at magnitude 9, as in the paper) or
    TrivialAugmentWide (``auto_augment``), ColorJitter (brightness = contrast = saturation =
    ``color_jitter``) and RandomErasing (probability ``random_erasing``, timm's default area
    and aspect ranges).

    Random erasing runs here, on uint8, rather than after normalisation (timm's place for it) so
    the output stays uint8: the rectangle is filled with the backbone's mean colour, which
    normalises to zero, the value torchvision's RandomErasing writes into a normalised tensor.
    Mixup and CutMix mix pairs of images, so they are batch operations (``models.heads.batch_mixer``).

    Args:
        augment: the job's augmentation settings.
        preprocess: gives the output size, interpolation and mean colour.

    Returns:
        A transform for single images (v2 transforms draw one set of parameters per call,
        so apply it per image, not per batch); ``v2.Identity`` when everything is disabled.
    """
    ops: list[v2.Transform] = []
    if augment.random_resized_crop:
        ops.append(
            v2.RandomResizedCrop(
                preprocess.image_size,
                scale=(augment.crop_scale_min, 1.0),
                interpolation=interpolation_mode(preprocess.interpolation),
                antialias=True,
            )
        )
    if augment.hflip:
        ops.append(v2.RandomHorizontalFlip())
    # As timm: what geometric ops uncover and what erasing removes is filled with the mean colour
    # (zero after normalisation). Those ops support only nearest and bilinear on tensors.
    mean_colour: Any = [round(255 * m) for m in preprocess.mean]
    if augment.auto_augment == "randaugment":
        ops.append(
            v2.RandAugment(num_ops=2, magnitude=9, interpolation=InterpolationMode.BILINEAR, fill=mean_colour)
        )
    elif augment.auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR, fill=mean_colour))
    if augment.color_jitter > 0:
        j = augment.color_jitter
        ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if augment.random_erasing > 0:
        ops.append(v2.RandomErasing(p=augment.random_erasing, value=mean_colour))
    return v2.Compose(ops) if ops else v2.Identity()


def train_transform(augment: AugmentSpec, preprocess: Preprocess) -> v2.Compose:
    """Augmentation then normalisation: uint8 CHW image tensor in, float32 CHW out."""
    return v2.Compose([augment_transform(augment, preprocess), normalize_transform(preprocess)])


def augment_batch(images: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    """Apply a per-image ``transform`` to every image of a uint8 NCHW batch (fresh randomness each)."""
    if isinstance(transform, v2.Identity):
        return images
    return torch.stack([transform(img) for img in images])


def to_nchw_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC array or tensor to a uint8 NCHW tensor (a view where possible)."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2)


def normalize_batch(
    images: np.ndarray | torch.Tensor, preprocess: Preprocess, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 NHWC images to the float32 NCHW model input (evaluation and prediction).

    Args:
        images: ``uint8 [N, H, W, 3]`` numpy array or tensor.
        preprocess: the backbone's mean/std.
        device: where to put the result (moved as uint8, normalised there); default: in place.

    Returns:
        ``float32 [N, 3, H, W]`` normalised tensor.
    """
    t = to_nchw_uint8(images)
    if device is not None:
        t = t.to(device, non_blocking=True)
    return normalize_transform(preprocess)(t.contiguous())
