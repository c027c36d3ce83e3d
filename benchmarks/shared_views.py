"""Members sharing one cache of augmented views against each member drawing its own, same run.

With augmentation, the frozen prefix's features are cached for ``cache.views`` augmented views of
every training image. Members now share one such cache (``models.member``: drawn under the job's
seed, each member cycling the views from its own offset) instead of each building its own. This
trains the same recipes both ways on the held-out split of ``benchmarks.quality`` and prints the
test accuracy, ECE and wall time of each, and the time ratio:

    ZOOFIT_TORCH_THREADS=2 python -m benchmarks.shared_views --datasets mnist,animals
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.quality import ISSUE, decoder, load, score_zoofit, split
from models.spec import TrainSpec
from models.training import _Run, train

# issue #14's recipe (2 members of 12 epochs) and the plain job's usual shape at 50 a class (5 of 6)
RECIPES: dict[str, dict[str, Any]] = {
    "issue 2m 12ep": ISSUE,
    "96px 5m 6ep": {**ISSUE, "epochs": 6, "ensemble": {"members": 5}},
}


@contextlib.contextmanager
def own_views() -> Iterator[None]:
    """Every member builds its own cache (the code before sharing: no share key, the member's seed)."""
    real = _Run.cache_for

    def own(self: _Run, steps: Any, n: int, fs: Any, pre: Any, augment: Any, seed: int, share: Any = None) -> Any:
        member_seed = self.spec.seed + len(self.members)  # the member being set up
        return real(self, steps, n, fs, pre, augment, member_seed if augment is not None else seed, None)

    _Run.cache_for = own  # type: ignore[method-assign]
    try:
        yield
    finally:
        _Run.cache_for = real  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,animals")
    ap.add_argument("--per-class", type=int, default=50)
    args = ap.parse_args()
    print("| dataset | recipe | views | test acc | ECE | seconds |\n|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        images, labels = load(name)
        parts = split(labels, args.per_class)
        assert parts is not None, f"{name}: too few images a class"
        tr, te = parts
        decode, test = decoder(images[tr], labels[tr]), decoder(images[te], labels[te])
        for recipe, fields in RECIPES.items():
            spec = TrainSpec.model_validate(fields)
            seconds: dict[str, float] = {}
            for views in ("own", "shared"):
                with own_views() if views == "own" else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    result = train(decode(int(spec.image_size or 96)), spec)
                    seconds[views] = time.perf_counter() - t0
                acc, ece = score_zoofit(result, test)
                print(f"| {name} | {recipe} | {views} | {acc:.4f} | {ece:.4f} | {seconds[views]:.1f} |", flush=True)
            print(f"| {name} | {recipe} | own / shared time | | | {seconds['own'] / seconds['shared']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
