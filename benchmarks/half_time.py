"""What can any recipe reach in half the time of issue #14's hand-picked one? (its first target)

The issue asks the plain job to beat its hand-picked recipe (96 px, three groups frozen, light
augmentation, Nesterov 0.02, 12 epochs, two members) on average "in at most half its time". A
planner can at best match the best fixed recipe that fits that time, less its own measuring and lr
finding. So this script times the issue's recipe (the baseline, in the same run) and a grid of fixed
recipes by hand around half its time, on the held-out split of ``benchmarks.quality``, and prints
which of them, if any, beat the baseline in at most half its wall time.

    ZOOFIT_TORCH_THREADS=2 python -m benchmarks.half_time --datasets mnist,animals,lfw --grid shapes
    ZOOFIT_TORCH_THREADS=2 python -m benchmarks.half_time --datasets mnist,animals --grid epochs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from benchmarks.quality import ISSUE, decoder, load, score_zoofit, split
from models.spec import TrainSpec
from models.training import train

TOP = {"mode": "first_n", "stages": 7}
NONE = {"preset": "none"}
# name -> the fields that differ from the issue's recipe; "shapes": depth, size and members around half
# its time; "epochs": the deeper shape at fewer epochs (the issue's 12 are more than it needs)
GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    "shapes": {
        "most 64px 1m": {"image_size": 64, "ensemble": {"members": 1}},
        "most 64px 2m": {"image_size": 64},
        "most 96px 1m": {"ensemble": {"members": 1}},
        "most 96px 6ep 2m": {"epochs": 6},
        "top 160px 3m": {"image_size": 160, "freeze": TOP, "augment": NONE, "ensemble": {"members": 3}},
        "top 224px 2m": {"image_size": 224, "freeze": TOP, "augment": NONE},
        "top 128px aug 2m": {"image_size": 128, "freeze": TOP},
        "all 64px 8ep 1m": {"image_size": 64, "freeze": {"mode": "none"}, "epochs": 8, "ensemble": {"members": 1}},
    },
    "epochs": {
        "most 96px 6ep 1m": {"epochs": 6, "ensemble": {"members": 1}},
        "most 96px 4ep 2m": {"epochs": 4},
        "most 96px 6ep 3m": {"epochs": 6, "ensemble": {"members": 3}},
        "most 64px 6ep 2m": {"image_size": 64, "epochs": 6},
        "most 64px 6ep 3m": {"image_size": 64, "epochs": 6, "ensemble": {"members": 3}},
        "most 128px 6ep 2m": {"image_size": 128, "epochs": 6},
        "top 160px 6ep 3m": {"image_size": 160, "freeze": TOP, "augment": NONE, "epochs": 6,
                             "ensemble": {"members": 3}},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,animals,lfw")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="shapes")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ZOOFIT_TORCH_THREADS", "2")))
    summary = []
    for name in args.datasets.split(","):
        images, labels = load(name)
        parts = split(labels, args.per_class)
        if parts is None:
            raise SystemExit(f"{name} has fewer than {args.per_class} + 10 images a class")
        tr, te = parts
        decode, test = decoder(images[tr], labels[tr]), decoder(images[te], labels[te])
        rows = []
        for recipe, fields in {"issue": {}, **GRIDS[args.grid]}.items():
            spec = TrainSpec.model_validate({**ISSUE, **fields})
            t0 = time.perf_counter()
            result = train(decode(spec.image_size), spec)
            seconds = time.perf_counter() - t0
            acc, _ = score_zoofit(result, test)
            rows.append({"dataset": name, "recipe": recipe, "test_acc": round(acc, 4), "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]
        half = [r for r in rows[1:] if r["seconds"] <= base["seconds"] / 2]
        best = max(half, key=lambda r: r["test_acc"]) if half else None
        summary.append(
            f"{name}: issue recipe {base['test_acc']:.4f} in {base['seconds']:.0f} s; best within half its time "
            + (f"{best['recipe']} {best['test_acc']:.4f} in {best['seconds']:.0f} s "
               f"({(best['test_acc'] - base['test_acc']) * 100:+.1f} points)" if best else "none fits")
        )
    print("\n".join(summary))


if __name__ == "__main__":
    main()
