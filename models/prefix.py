"""A backbone as a chain of steps, so the frozen prefix can run once and be cached.

The obvious training loop runs the whole network on every step, although the output of
the layers that stay frozen never changes for an image. ``model_steps`` cuts a timm model
into the same steps its ``forward`` runs (stem, each block stage, the rest of the features,
pooling, dropout + classifier); ``forward_steps`` runs any range of them, so that
``forward_steps(steps, forward_steps(steps, x, 0, k), k)`` equals ``model(x)``.

``FeatureCache`` keeps the output of the first ``k`` steps for every training image (one or
more augmented views) and every validation image; training then runs only steps ``k..``.
With no augmentation this is exact; with augmentation each epoch cycles through the cached
views. The frozen steps run in eval mode in both paths (no dropout/drop-path there, BatchNorm
statistics fixed), which is what makes caching them exact.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .units import format_bytes


@dataclass(frozen=True)
class Step:
    """One step of a model's forward pass.

    Attributes:
        name: what it covers, e.g. ``blocks.3`` or ``pool``.
        fn: the computation.
        modules: the modules it runs (their parameters decide whether the step is frozen).
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[nn.Module, ...]

    def trainable(self) -> bool:
        """Whether any parameter of the step trains."""
        return any(p.requires_grad for m in self.modules for p in m.parameters())

    def deterministic(self) -> bool:
        """False for a step whose output is random by design even without parameters to train
        (fractional max pooling): it must run fresh every step, never from a cache."""
        return not any(getattr(sub, "random_in_training", False) for m in self.modules for sub in m.modules())


def _dropout_then(model: nn.Module, classifier: Callable[[], nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
        if rate > 0:
            x = F.dropout(x, p=rate, training=model.training)
        return classifier()(x)

    return run


def model_steps(model: nn.Module) -> list[Step] | None:
    """The forward pass of a timm model as steps, or None for a family not covered.

    Covered: EfficientNet (incl. Lite and ``test_efficientnet``), MobileNetV3, ResNet, ConvNeXt.
    The last step is always ``classifier`` (dropout, then ``model.get_classifier()``), the one
    before it ``pool`` (global pooling and whatever the head does before dropout).
    """
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    from .heads import MultiStageEfficientNet

    m = cast(Any, model)
    steps: list[Step] = []
    if isinstance(model, MultiStageEfficientNet):
        # The taps cross every stage: the features are one step (cached whole when all of it is frozen).
        backbone = (m.conv_stem, m.bn1, m.blocks, m.conv_head, m.bn2, m.global_pool)
        steps.append(Step("multi_stage_features", model.multi_stage_features, backbone))
        steps.append(Step("classifier", model.multi_stage_head, (m.classifier,)))
    elif isinstance(model, EfficientNet | MobileNetV3):
        steps.append(Step("conv_stem+bn1", lambda x: m.bn1(m.conv_stem(x)), (m.conv_stem, m.bn1)))
        steps += [Step(f"blocks.{i}", b, (b,)) for i, b in enumerate(m.blocks)]
        if isinstance(model, EfficientNet):
            steps.append(Step("conv_head+bn2", lambda x: m.bn2(m.conv_head(x)), (m.conv_head, m.bn2)))
            steps.append(Step("pool", lambda x: m.global_pool(x), (m.global_pool,)))
        else:
            steps.append(
                Step(
                    "pool",
                    lambda x: m.flatten(m.act2(m.norm_head(m.conv_head(m.global_pool(x))))),
                    (m.global_pool, m.conv_head, m.norm_head, m.act2),
                )
            )
        steps.append(Step("classifier", _dropout_then(model, lambda: m.classifier), (m.classifier,)))
    elif isinstance(model, ResNet):
        steps.append(Step("stem", lambda x: m.maxpool(m.act1(m.bn1(m.conv1(x)))), (m.conv1, m.bn1, m.maxpool)))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(m, name)
            steps.append(Step(name, layer, (layer,)))
        steps.append(Step("pool", lambda x: m.global_pool(x), (m.global_pool,)))
        steps.append(Step("classifier", _dropout_then(model, lambda: m.fc), (m.fc,)))
    elif isinstance(model, ConvNeXt):
        steps.append(Step("stem", m.stem, (m.stem,)))
        steps += [Step(f"stages.{i}", s, (s,)) for i, s in enumerate(m.stages)]
        head = m.head
        steps.append(
            Step(
                "pool",
                lambda x: head.pre_logits(head.flatten(head.norm(head.global_pool(m.norm_pre(x))))),
                (m.norm_pre, head.global_pool, head.norm, head.pre_logits),
            )
        )
        steps.append(Step("classifier", lambda x: head.fc(head.drop(x)), (head.drop, head.fc)))
    else:
        return None
    return steps


def forward_steps(steps: list[Step], x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Run ``steps[start:stop]`` on ``x``."""
    for step in steps[start:stop]:
        x = step.fn(x)
    return x


def frozen_prefix(steps: list[Step]) -> int:
    """How many leading steps have no trainable parameter and no randomness (never the classifier)."""
    n = 0
    for step in steps[:-1]:
        if step.trainable() or not step.deterministic():
            break
        n += 1
    return n


def set_prefix_eval(steps: list[Step], n: int) -> None:
    """Put the modules of the first ``n`` steps into eval mode (call after ``model.train()``)."""
    for step in steps[:n]:
        for module in step.modules:
            module.eval()


@dataclass
class CachePlan:
    """What the frozen-prefix cache does for one run, as recorded in the job.

    Attributes:
        path: ``memory``, ``disk`` or ``off``.
        reason: why (always set).
        prefix_steps: number of cached steps.
        prefix: name of the last cached step (``-`` when off).
        views: augmented views per training image (1 without augmentation).
        feature_shape: shape of one cached feature tensor.
        bytes: the cache's size.
        dtype: element type stored.
    """

    path: str
    reason: str
    prefix_steps: int = 0
    prefix: str = "-"
    views: int = 0
    feature_shape: list[int] = field(default_factory=list)
    bytes: int = 0
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FeatureCache:
    """Cached prefix outputs: ``views`` tensors for the training images, one for validation.

    Rows are indexed by position in ``train_idx`` / ``val_idx`` (not by dataset index).
    """

    def __init__(
        self,
        train: list[torch.Tensor | np.ndarray],
        val: torch.Tensor | np.ndarray,
        device: torch.device,
        spill: tempfile.TemporaryDirectory[str] | None = None,
    ) -> None:
        self.train = train
        self.val = val
        self.device = device
        self._tmp = spill  # the spilled files' folder, removed by close()

    def _take(self, store: torch.Tensor | np.ndarray, rows: np.ndarray) -> torch.Tensor:
        if isinstance(store, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(store[np.sort(rows)]))
            # keep the caller's order: rows were sorted for the memmap read
            order = np.argsort(np.argsort(rows))
            t = t[torch.from_numpy(order)]
            if self.device.type == "cuda":
                t = t.pin_memory()  # so the copy below overlaps with compute
            return t.to(self.device, non_blocking=True).float()
        return store[torch.from_numpy(rows).to(store.device)].float()

    def train_batch(self, view: int, rows: np.ndarray) -> torch.Tensor:
        """Features of training rows ``rows`` in view ``view % views``."""
        return self._take(self.train[view % len(self.train)], rows)

    def val_batch(self, rows: np.ndarray) -> torch.Tensor:
        """Features of validation rows ``rows``."""
        return self._take(self.val, rows)

    def close(self) -> None:
        self.train, self.val = [], np.empty(0)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@dataclass(frozen=True)
class CacheBounds:
    """Where a frozen-prefix feature cache may live.

    Attributes:
        memory_bytes: the most it may hold in memory (on the model's device).
        disk_bytes: the most it may spill to ``dir`` when memory is not enough (0: never).
        dir: where it spills (a temporary folder is made inside it and removed by ``close``).
    """

    memory_bytes: int = 2 * 1024**3
    disk_bytes: int = 0
    dir: Path | None = None


@dataclass(frozen=True)
class CacheInputs:
    """The images a cache is built from.

    Attributes:
        train: ``(view, rows) -> model input`` for training rows (positions in the split);
            view ``v`` of a row must be the same image transform every time it is asked for.
        val: ``rows -> model input`` for validation rows.
        n_train: training images.
        n_val: validation images.
        views: augmented views per training image (1: no augmentation).
    """

    train: Callable[[int, np.ndarray], torch.Tensor]
    val: Callable[[np.ndarray], torch.Tensor]
    n_train: int
    n_val: int
    views: int = 1


def build_cache(
    steps: list[Step],
    n: int,
    *,
    inputs: CacheInputs,
    device: torch.device,
    bounds: CacheBounds,
    batch: int = 64,
    autocast: Callable[[], Any] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> tuple[FeatureCache | None, CachePlan]:
    """Run the first ``n`` steps once over every image and keep the outputs.

    Args:
        steps: ``model_steps`` of the model (its first ``n`` steps frozen and in eval mode).
        n: number of steps to cache.
        inputs: the training and validation images, and the augmented views wanted.
        device: where the model runs.
        bounds: the memory and disk the cache may use.
        batch: images per forward pass.
        autocast: context manager factory for mixed precision on a GPU.
        should_stop: raises to cancel.

    Returns:
        The cache (None when it does not fit anywhere) and the ``CachePlan`` saying what happened.
    """
    train_inputs, val_inputs = inputs.train, inputs.val
    n_train, n_val, views = inputs.n_train, inputs.n_val, inputs.views
    memory_bytes, disk_bytes, spill_dir = bounds.memory_bytes, bounds.disk_bytes, bounds.dir
    with torch.inference_mode():
        probe = forward_steps(steps, val_inputs(np.arange(1)), 0, n).float()
    shape = list(probe.shape[1:])
    per_image = int(np.prod(shape)) * 4
    name = steps[n - 1].name
    want_views = views
    # Fewer views before giving up memory: at least one view always beats recomputing.
    while want_views > 1 and per_image * (n_train * want_views + n_val) > memory_bytes:
        want_views -= 1
    total = per_image * (n_train * want_views + n_val)
    note = "" if want_views == views else f" ({views} views asked, {want_views} fit in the memory bound)"
    if total <= memory_bytes:
        path = "memory"
    elif spill_dir is not None and per_image * (n_train * views + n_val) <= disk_bytes:
        path, want_views = "disk", views
        total = per_image * (n_train * views + n_val)
        note = ""
    else:
        reason = (
            f"the cache would need {format_bytes(total)}, more than the memory bound {format_bytes(memory_bytes)}"
            + (f" and the disk bound {format_bytes(disk_bytes)}" if spill_dir is not None else "")
            + ": running the full forward pass every step"
        )
        return None, CachePlan("off", reason, n, name, 0, shape, 0)

    tmp: tempfile.TemporaryDirectory[str] | None = None

    def store(count: int, label: str) -> torch.Tensor | np.ndarray:
        if path == "memory":
            return torch.empty([count, *shape], dtype=torch.float32, device=device)
        assert tmp is not None
        return np.lib.format.open_memmap(
            Path(tmp.name) / f"{label}.npy", mode="w+", dtype=np.float32, shape=(count, *shape)
        )

    if path == "disk":
        assert spill_dir is not None
        spill_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix="features-", dir=spill_dir)
    try:
        train_views = []
        with torch.inference_mode():
            for v in range(want_views):
                out = store(n_train, f"train-{v}")
                for s in range(0, n_train, batch):
                    if should_stop is not None:
                        should_stop()
                    rows = np.arange(s, min(s + batch, n_train))
                    with autocast() if autocast is not None else contextlib.nullcontext():
                        h = forward_steps(steps, train_inputs(v, rows), 0, n).float()
                    _write(out, s, h)
                train_views.append(out)
            val = store(n_val, "val")
            for s in range(0, n_val, batch):
                rows = np.arange(s, min(s + batch, n_val))
                with autocast() if autocast is not None else contextlib.nullcontext():
                    h = forward_steps(steps, val_inputs(rows), 0, n).float()
                _write(val, s, h)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    cache = FeatureCache(train_views, val, device, spill=tmp)
    reason = (
        f"steps up to {name} are frozen: their output is computed once per image"
        + (f", {want_views} augmented views cycled one per epoch" if want_views > 1 else "")
        + note
        + (f"; spilled to disk (over the memory bound {format_bytes(memory_bytes)})" if path == "disk" else "")
    )
    return cache, CachePlan(path, reason, n, name, want_views, shape, total)


def _write(out: torch.Tensor | np.ndarray, start: int, h: torch.Tensor) -> None:
    if isinstance(out, np.ndarray):
        out[start : start + len(h)] = h.cpu().numpy()
    else:
        out[start : start + len(h)] = h


def cache_problem(
    *,
    family_supported: bool,
    mode: str,
    train_bn: bool,
    mixes: bool,
    prefix_steps: int,
) -> str | None:
    """Why the frozen-prefix cache cannot be used; None when it can."""
    if mode == "off":
        return "cache.mode is 'off'"
    if not family_supported:
        return "this backbone family is not split into steps: running the full forward pass"
    if train_bn:
        return "freeze.train_bn: the frozen BatchNorm layers normalise with batch statistics, so outputs vary"
    if mixes:
        return "mixup/cutmix mix the images before the backbone, so every step needs a fresh forward pass"
    if prefix_steps == 0:
        return "nothing is frozen for the whole run"
    return None


__all__ = [
    "CachePlan",
    "FeatureCache",
    "Step",
    "build_cache",
    "cache_problem",
    "forward_steps",
    "frozen_prefix",
    "model_steps",
    "set_prefix_eval",
]
