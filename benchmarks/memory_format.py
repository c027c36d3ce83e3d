"""channels_last against the default (contiguous NCHW) layout on this device, in images per second.

Training runs every model and batch in channels_last (``models.member``, ``models.training``), on the
CPU as on a GPU: the arithmetic is the same, and oneDNN's (and cuDNN's) convolutions run faster in it.
This prints, for the shapes the planner plans, the frozen prefix's inference (the feature cache) and
the training step of the part that trains, in both layouts, and their ratio, measured in the same run.

    ZOOFIT_TORCH_THREADS=2 python -m benchmarks.memory_format
"""

from __future__ import annotations

import argparse
import os

import torch

from models.freezing import apply_freeze
from models.heads import HeadConfig, create_classifier
from models.planner import best_of, time_depth
from models.prefix import model_steps

SHAPES = ((3, 64), (3, 96), (7, 160), (7, 224))  # (frozen groups, image size): deeper fine-tune, top stage


def rates(frozen: int, size: int, channels_last: bool, batch: int, device: torch.device) -> tuple[float, float]:
    """(prefix img/s, training step img/s) of Lite0 with ``frozen`` groups frozen at ``size`` px."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_classifier("tf_efficientnet_lite0", weights="none", num_classes=10, head=HeadConfig())
    apply_freeze(model, mode="first_n", stages=frozen, train_bn=False)
    model = model.to(device).to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.arange(batch, device=device) % 10
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    # the planner's own timing of a depth (models.planner.time_depth), in either layout
    prefix_s, train_s, _eval_s, _cached = time_depth(
        model, model_steps(model), x, y, lambda fn: best_of(fn, 3, sync=sync)
    )
    return batch / prefix_s, batch / train_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ZOOFIT_TORCH_THREADS", "2")))
    device = torch.device(args.device)
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("frozen  size | prefix img/s: NCHW  channels_last  ratio | train img/s: NCHW  channels_last  ratio")
    for frozen, size in SHAPES:
        p0, t0 = rates(frozen, size, False, args.batch, device)
        p1, t1 = rates(frozen, size, True, args.batch, device)
        print(f"{frozen:6d} {size:5d} | {p0:18.1f} {p1:14.1f} {p1 / p0:6.2f} | {t0:17.1f} {t1:14.1f} {t1 / t0:6.2f}")


if __name__ == "__main__":
    main()
