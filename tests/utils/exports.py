"""Builders for the export tests: random-init predictors of any zoo backbone, validation-like images."""

from __future__ import annotations

import copy

import numpy as np
import torch

from models.artifact import Predictor
from models.ensemble import Ensemble
from models.heads import HeadConfig, create_classifier
from models.zoo import preprocess_for


def random_predictor(
    backbones: list[str], image_size: int = 32, classes: int = 3, *, shared_prefix: int = 0, temperature: float = 1.5,
    seed: int = 0,
) -> Predictor:
    """A predictor of random-init members (``weights='none'``), eval mode, on the CPU.

    With ``shared_prefix`` > 0 every member is a copy of the first whose parameters after that
    many leading modules are re-drawn: a frozen prefix the ensemble shares.
    """
    torch.manual_seed(seed)
    pre = preprocess_for(backbones[0], image_size)
    members = [
        create_classifier(b, weights="none", num_classes=classes, head=HeadConfig(), image_size=image_size)
        for b in backbones
    ]
    for m in members:
        _random_statistics(m)
    if shared_prefix:
        lead = members[0]
        members = [lead]
        for _ in backbones[1:]:
            m = copy.deepcopy(lead)
            for i, child in enumerate(m.children()):
                if i >= shared_prefix:
                    for p in child.parameters():
                        torch.nn.init.normal_(p, std=0.05)
                    _random_statistics(child)
            members.append(m)
    norms = [(preprocess_for(b).mean, preprocess_for(b).std) for b in backbones]
    model = Ensemble(members, input_norm=(pre.mean, pre.std), member_norms=norms).eval()
    manifest = {"classes": [f"c{i}" for i in range(classes)], "preprocess": pre.to_dict()}
    return Predictor(model, list(manifest["classes"]), pre, manifest, torch.device("cpu"), temperature)


def _random_statistics(module: torch.nn.Module) -> None:
    # Random BatchNorm statistics, so that eval-mode normalisation is not an identity.
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.BatchNorm2d) and mod.running_mean is not None:
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)


def image_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``uint8 [n, size, size, 3]`` smooth random images (validation-like: not white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.float32)
    grid = np.linspace(0, 3, size)
    i0 = np.floor(grid).astype(int).clip(0, 2)
    t = (grid - i0)[None, :, None, None]
    rows = coarse[:, i0] * (1 - t) + coarse[:, i0 + 1] * t
    t2 = (grid - i0)[None, None, :, None]
    img = rows[:, :, i0] * (1 - t2) + rows[:, :, i0 + 1] * t2
    noise = rng.normal(0, 12, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)
