"""Images per second of inference passes at several batch sizes on this device, against batches of 128.

Every inference pass (the frozen-prefix cache, validation, predict, the planner's probes) runs in
chunks of ``models.runtime.inference_batch`` images: on a CPU small batches keep the early layers'
large activations in the caches. This prints, for the shapes the planner plans, the frozen prefix
(what the feature cache computes) and the whole network (validation without a cache, predict), at
each batch size, and the ratio to 128 (the chunk every pass used before), measured in the same run.

    ZOOFIT_TORCH_THREADS=2 python -m benchmarks.inference_batch
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from models.freezing import apply_freeze
from models.heads import HeadConfig, create_classifier
from models.prefix import forward_steps, frozen_prefix, model_steps
from models.runtime import inference_batch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
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


if __name__ == "__main__":
    main()
