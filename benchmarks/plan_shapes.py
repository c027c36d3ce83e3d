"""Which plan shape wins under a time budget? The planner's own against a deeper, augmented fine-tune.

Each config is a partial job whose fields are kept (the planner plans the rest for the budget), scored
on the held-out split of ``benchmarks.quality`` (same data, same split). Used for docs/quality.md's
"deeper fine-tuning under the default budget" (issue #14).

    ZOOFIT_TORCH_THREADS=2 python -m benchmarks.plan_shapes --dataset animals
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.quality import decoder, load, score_zoofit, split
from models.planner import fit_budgeted
from models.spec import TrainSpec

MOST = {"mode": "first_n", "stages": 3}
CONFIGS: list[dict[str, object]] = [
    {},  # the planner's own choice (the plain job's shape)
    {"freeze": MOST, "augment": {"preset": "light"}},  # issue #14's hand recipe's shape
    {"freeze": MOST, "augment": {"preset": "none"}},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="animals")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--budget", type=float, default=75.0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ZOOFIT_TORCH_THREADS", "2")))
    images, labels = load(args.dataset)
    parts = split(labels, args.per_class)
    if parts is None:
        raise SystemExit(f"{args.dataset} has fewer than {args.per_class} + 10 images a class")
    tr, te = parts
    decode, test = decoder(images[tr], labels[tr]), decoder(images[te], labels[te])
    for cfg in CONFIGS:
        spec = TrainSpec.model_validate({"budget_s": args.budget, **cfg, "keep": sorted(cfg)})
        t0 = time.perf_counter()
        result, planned = fit_budgeted(decode, spec, args.budget)
        seconds = time.perf_counter() - t0
        acc, ece = score_zoofit(result, test)
        print(json.dumps({
            "kept": cfg, "test_acc": round(acc, 4), "ece": round(ece, 4), "seconds": round(seconds, 1),
            "size": planned.image_size, "freeze": planned.freeze.mode, "stages": planned.freeze.stages,
            "epochs": planned.epochs, "members": f"{len(result.members)}/{planned.ensemble.members}",
            "augment": planned.augment.preset,
        }), flush=True)


if __name__ == "__main__":
    main()
