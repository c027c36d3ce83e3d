"""Named starting recipes for the console's new-job form and ``zoofit jobs submit --preset``.

Each preset is a partial job (every field the job schema has, except ``dataset_id``); what it leaves
out keeps the schema's default, and a user may override any field on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    description: str
    job: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "fast",
            "Fast (CPU)",
            "One EfficientNet-Lite0 at 64 px with its first three groups frozen: the frozen prefix is "
            "computed once and cached, so a few hundred images train in about a minute on 2 CPU cores.",
            {
                "backbone": "tf_efficientnet_lite0",
                "weights": "bundled",
                "image_size": 64,
                "freeze": {"mode": "first_n", "stages": 3},
                "augment": {"preset": "light"},
                "optimizer": {"name": "nesterov", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
                "schedule": {"name": "cosine", "warmup_epochs": 1},
                "epochs": 6,
                "patience": 3,
                "ensemble": {"members": 1},
            },
        ),
        Preset(
            "balanced",
            "Balanced",
            "Three EfficientNet-Lite0 members at 96 px sharing a frozen prefix, averaged into an "
            "ensemble: a few points above 'fast' for about three times its time.",
            {
                "backbone": "tf_efficientnet_lite0",
                "weights": "bundled",
                "image_size": 96,
                "freeze": {"mode": "first_n", "stages": 3},
                "augment": {"preset": "light"},
                "optimizer": {"name": "nesterov", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
                "schedule": {"name": "cosine", "warmup_epochs": 1},
                "epochs": 10,
                "patience": 4,
                "ensemble": {"members": 3},
            },
        ),
        Preset(
            "best",
            "Best accuracy",
            "Five EfficientNet-Lite0 members at 128 px, fewer groups frozen, standard augmentation and "
            "Polyak (EMA) weights, greedy member selection: the most accurate, and the slowest (a GPU helps).",
            {
                "backbone": "tf_efficientnet_lite0",
                "weights": "bundled",
                "image_size": 128,
                "freeze": {"mode": "first_n", "stages": 2},
                "augment": {"preset": "standard"},
                "optimizer": {"name": "nesterov", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
                "schedule": {"name": "cosine", "warmup_epochs": 1},
                "epochs": 15,
                "patience": 5,
                "ensemble": {"members": 5, "ema": True, "greedy": True},
            },
        ),
    )
}
