"""Images per second of inference passes at several batch sizes on this device, against batches of 128.

Every inference pass (the frozen-prefix cache, validation, predict, the planner's probes) runs in
chunks of ``models.runtime.inference_batch`` images: on a CPU small batches keep the early layers'
large activations in the caches. This prints, for the shapes the planner plans, the frozen prefix
(what the feature cache computes) and the whole network (validation without a cache, predict), at
each batch size, and the ratio to 128 (the chunk every pass used before), measured in the same run.
``--jobs`` then trains whole recipes (issue #14's hand recipe, and the top stage at 224 px) on the
quality benchmark's MNIST split twice, in chunks of 128 (the baseline) and in zoofit's, and scores
both on the held-out images.

    ZOOFIT_TORCH_THREADS=2 python -m benchmarks.inference_batch [--jobs]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch

import models.runtime
from models.freezing import apply_freeze
from models.heads import HeadConfig, create_classifier
from models.prefix import forward_steps, frozen_prefix, model_steps
from models.runtime import GPU_INFERENCE_BATCH, inference_batch

# (frozen groups, image size): the deeper fine-tune and the top stage at the sizes the planner plans
SHAPES = ((3, 96), (3, 160), (3, 224), (7, 96), (7, 160), (7, 224))
BATCHES = (2, 4, 8, 16, 32, 64, 128)
BASELINE = 128


def rate(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int, reps: int) -> float:
    """Images per second of ``fn`` over ``x`` in chunks of ``batch`` (fastest of ``reps`` passes)."""
    fn(x[:batch])  # warm-up: oneDNN builds its kernels for this shape
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for s in range(0, len(x), batch):
            fn(x[s : s + batch])
        best = min(best, time.perf_counter() - t)
    return len(x) / best


# whole jobs: issue #14's recipe, and the top stage at the size where chunks matter most
JOBS = {
    "issue #14's recipe (96 px, most, aug, 2 m)": {},
    "top stage 224 px, 3 m": {"image_size": 224, "freeze": {"mode": "first_n", "stages": 7},
                              "augment": {"preset": "none"}, "ensemble": {"members": 3}},
}


def jobs() -> None:
    """Seconds and held-out accuracy of whole jobs in chunks of 128 and in zoofit's, one after the other."""
    from benchmarks.quality import ISSUE, decoder, load, score_zoofit, split
    from models.spec import TrainSpec
    from models.training import train

    images, labels = load("mnist")
    parts = split(labels, 50)
    assert parts is not None
    tr, te = parts
    decode, test = decoder(images[tr], labels[tr]), decoder(images[te], labels[te])
    ours = models.runtime.CPU_INFERENCE_PIXELS
    print("job | chunk 128: s, acc | zoofit's: s, acc | speed-up")
    for name, fields in JOBS.items():
        spec = TrainSpec.model_validate({**ISSUE, **fields})
        data = decode(spec.image_size or 96)
        out = []
        for pixels in (GPU_INFERENCE_BATCH * 4096 * 4096, ours):  # the first: 128 images whatever their size
            models.runtime.CPU_INFERENCE_PIXELS = pixels
            t = time.perf_counter()
            result = train(data, spec)
            seconds = time.perf_counter() - t
            out.append((seconds, score_zoofit(result, test)[0]))
        models.runtime.CPU_INFERENCE_PIXELS = ours
        (s0, a0), (s1, a1) = out
        print(f"{name} | {s0:.1f}, {a0:.4f} | {s1:.1f}, {a1:.4f} | {s0 / s1:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--jobs", action="store_true", help="also time whole jobs both ways (about 4 minutes)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ZOOFIT_TORCH_THREADS", "2")))
    device = torch.device(args.device)
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images a pass")
    print("frozen  size  what    | " + "  ".join(f"b{b:<4d}img/s" for b in BATCHES)
          + " | ratio to b128 at each | zoofit's chunk: img/s, ratio")
    model = create_classifier("tf_efficientnet_lite0", weights="none", num_classes=10, head=HeadConfig())
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    steps = model_steps(model)
    assert steps is not None
    for frozen, size in SHAPES:
        apply_freeze(model, mode="first_n", stages=frozen, train_bn=False)
        k = frozen_prefix(steps)
        x = torch.randn(args.images, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for what, fn in (("prefix", lambda b, k=k: forward_steps(steps, b, 0, k)), ("network", model)):
                rates = [rate(fn, x, b, args.reps) for b in BATCHES]
                base = rates[BATCHES.index(BASELINE)]
                chunk = inference_batch(device, size)
                ours = rate(fn, x, chunk, args.reps)
                print(f"{frozen:6d} {size:5d}  {what:7s} | " + "  ".join(f"{r:10.1f}" for r in rates)
                      + " | " + " ".join(f"{r / base:4.2f}" for r in rates)
                      + f" | b{chunk}: {ours:.1f}, {ours / base:.2f}")
    if args.jobs:
        jobs()


if __name__ == "__main__":
    main()
