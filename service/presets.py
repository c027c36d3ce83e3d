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
            "Fast (1 minute)",
            "A 60-second time budget: zoofit measures this machine on your images, then picks the image "
            "size, how much of EfficientNet-Lite0 trains (little data: only a new classifier or the top stage; "
            "more data: more of the network), the epochs and the learning rate (a range test), and stops in "
            "time with the best weights. The report's plan section says what it chose and why.",
            {"budget_s": 60},
        ),
        Preset(
            "balanced",
            "Balanced (3 minutes)",
            "A 180-second time budget, planned the same way: the extra time buys a larger image size "
            "and more ensemble members (averaged), usually a few points above 'fast'.",
            {"budget_s": 180},
        ),
        Preset(
            "best",
            "Best accuracy (10 minutes)",
            "A 600-second time budget with Polyak (EMA) weights and greedy selection of the ensemble's "
            "members on validation: the planner fills the time with the largest size and the most members "
            "that fit; when that leaves most of the time unused (a small dataset, a GPU) it fine-tunes more "
            "of the network with light augmentation, or moves to the larger bundled EfficientNet-Lite1 or "
            "Lite2. The most accurate, and the slowest.",
            {"budget_s": 600, "ensemble": {"ema": True, "greedy": True}},
        ),
    )
}
