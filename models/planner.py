"""The best model a time budget can buy: measure this hardware on the data, plan the recipe, train.

``budget_s`` on a job hands the recipe to the planner. It

1. **measures** the throughput of the device on a batch of the real images (resized), for each
   candidate image size and each candidate frozen depth: the frozen prefix's inference speed (it is
   computed once, into the feature cache), the trainable part's training step, and its evaluation;
   the rule's depth (below) is measured first and shallower ones only if it cannot be planned; a
   depth is not measured past the first size too slow for the time (``could_plan``), and
   measuring stops before a size whose predicted cost overruns ``MEASURE_SHARE`` of the budget;
2. **plans** (``plan_recipe``, pure: unit-tested on synthetic tables) by the lecture's rule, in
   training images per class: little data trains less of the network (a linear probe on the
   pretrained features), more data fine-tunes more (the top stage, then most of it, then all).
   Then the largest image size at which the time buys all ``MAX_MEMBERS`` members at their target
   epochs (``target_epochs``: 6 for an augmented fine-tune of "most", else 12): members before size;
   failing that, the largest whose one member fits ``FIRST_MEMBER_SHARE`` of the budget, and what is
   left buys more members (an averaged ensemble), only once one member trains its full epochs.
   It plans for ``THROUGHPUT_SAFETY`` of the measured speed (a shared machine gets
   busier after measuring). When even the smallest size does not fit, fewer epochs (down to
   ``MIN_EPOCHS``: the rule's depth at fewer epochs beats a shallower one at all of them), then a
   deeper freeze, then a linear probe.
   When the top stage trains its epochs, one step deeper with light augmentation is measured and
   planned instead (``_deeper_step``) if it trains its epochs with enough members: ``DEEPER_MIN_MEMBERS``
   on data a domain probe finds unlike ImageNet (``domain_probe``), ``DEEPER_MIN_MEMBERS_LIKE_IMAGENET``
   otherwise; a plan with most of the time still unused then moves up the bundled ``BACKBONE_LADDER``
   (``_larger_backbone``);
3. for a linear probe, **compares heads** on validation: a linear probe on the last stage's
   pooled features against one on several stages' features joined (``head_features``), both
   from one pass over the frozen pretrained network, and keeps the better;
4. **trains** with ``optimizer.lr: "auto"`` (``models.lr_finder``) and a deadline inside training
   (``TrainHooks.deadline``): whatever the estimate said, it stops in time with the best weights.
   The plan names up to ``MAX_MEMBERS`` members (``_members_up_to``): the run starts each only while
   the pace so far says it ends in time, the last one on a shorter schedule if only part fits.

Fields the user set (``TrainSpec.keep``, or the fields set on the spec) are kept as given; the
planner plans only the rest and says so. Every choice, the measured table and the estimate go to
the report's ``plan`` section. The admission cap on pixel-epochs (``models.budget.job_cost``)
binds the plan too: ``max_pixel_epochs`` trims members, then epochs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .budget import _kept, explicit_fields
from .spec import BACKBONES, LR_AUTO, TrainSpec, multi_stage_supported

# The rule, in training images per class (the lecture's: the less data, the less of the network trains).
PROBE_BELOW = 20  # below: linear probe on the pretrained features
TOP_STAGE_BELOW = 150  # below: fine-tune the top stage only
MOST_BELOW = 500  # below: freeze the first MOST_FROZEN groups; from here on: fine-tune everything
MOST_FROZEN = 3
DEPTHS = ("linear_probe", "top", "most", "all")

CANDIDATE_SIZES = (64, 96, 128, 160, 192, 224, 256)
TARGET_EPOCHS = 12
# An augmented fine-tune of all but the first groups learns in half the epochs: two members of 6 epochs
# tie two of 12 in half the time (MNIST 0.955 vs 0.957, animals 0.9375 vs 0.9385; one of 12: 0.946,
# 0.920), so the time buys members instead (``python -m benchmarks.half_time --grid epochs``).
AUGMENTED_DEEP_EPOCHS = 6
MIN_EPOCHS = 4
PROBE_EPOCHS = 30
MAX_MEMBERS = 5
# When the time buys one member of the augmented fine-tune, two of fewer epochs (down to MIN_EPOCHS) are
# planned if they fit this share of it at the measured speed (the second starts only if the first's
# pace leaves it time: models.training). 200 a class, 75 s, 64 px: MNIST 2 members of 4 epochs 0.9725
# against 1 of 4-6 0.961-0.9675, animals 0.967 against 0.953-0.959. 2 of 5 planned at 0.97 of the time
# trained 1 (the first ran 7% slower than measured); 2 of 4 at 0.86 ended 11 s before the deadline, and
# at 0.85 the pair was missed in one run of two (a second member not started costs the first one epoch).
PAIR_SHARE = 0.95
FIRST_MEMBER_SHARE = 0.5  # the first member may take this share of the training time at most
AUGMENT_FROM = 150  # training images per class from which light augmentation pays (cached views)
# Images a measured training step takes: the job's batch size, up to this (on a CPU a step of 32 images at
# 224 px runs 27% slower per image than one of 16, at 96 px 12% faster: the job's own size is what counts).
MAX_MEASURE_BATCH = 64
MEASURE_REPS = 2  # timed runs of each step after a warm-up; the fastest counts (see best_of)
# ...and more, up to MEASURE_MAX_REPS, while the timed runs so far took under MEASURE_REPS_S: cheap steps
# (small images) are timed 4 times. MNIST at 200 a class, 64 px, five plans each: the measured epoch's
# spread fell from 0.59 s to 0.20 s (mean 5.45 -> 5.25 s) for 0.5 s more measuring; a plan's epochs
# went 4-6 with 2 runs, 4-5 with 4.
MEASURE_MAX_REPS = 4
MEASURE_REPS_S = 0.5
MEASURE_SHARE = 0.15  # no size above 96 px is measured whose predicted time would run measuring past this share
SETUP_S = 1.0  # building a member (weights, cache allocation) before its first batch
RESERVE_SHARE = 0.04  # of the budget, kept for the ensemble's evaluation and saving after the deadline
RESERVE_MIN_S = 0.5
# Plan for this share of the measured speed: a shared machine gets busier after measuring (issue #14).
THROUGHPUT_SAFETY = 0.6
# Bundled ImageNet backbones in order of capacity: a budget the smaller one cannot use buys the next.
BACKBONE_LADDER = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
# A deeper, augmented fine-tune replaces the top stage's plan when it trains its epochs with this many
# members at this size or more: one member of 6 epochs at 96 px loses to the top stage (MNIST 0.943,
# animals 0.918), two win or tie (0.955 and 0.9375 against the plain job's 0.9405 and 0.941), and at
# 64 px two or three lose 1.4-2.6 points to two at 96 px (python -m benchmarks.half_time --grid epochs).
DEEPER_MIN_MEMBERS = 2
DEEPER_MIN_SIZE = 96
# ...on data like ImageNet's, where the top stage's features already fit, it needs this many: animals
# at 75 s, 3 members 0.933 against the top stage's 0.941; at 180 s, 4 members 0.950 against 0.9365.
DEEPER_MIN_MEMBERS_LIKE_IMAGENET = 4
# Once the deeper shape buys all MAX_MEMBERS at 6 epochs, 12-epoch members are planned instead if this
# many fit: at 600 s the 6-epoch plan grew to 224 px and scored 0.949 / 0.9595 (animals / MNIST) where
# 4-5 members of 12 epochs at 192 px had scored 0.958 / 0.971 (docs/quality.md).
LONG_DEEPER_MEMBERS = 4
# The data is unlike ImageNet (the lecture's transfer table: different data, fine-tune more) when a linear
# probe on several stages' features joined reaches under this share of the last stage's validation loss:
# MNIST 0.29-0.63, animals 0.79-0.88 (at 64-160 px, 50 and 200 a class); LFW's last stage is perfect
# (a ratio of two losses near 0 says nothing: under PROBE_LOSS_FLOOR the last stage fits).
UNLIKE_IMAGENET_LOSS_RATIO = 0.7
PROBE_LOSS_FLOOR = 0.05
DOMAIN_PROBE_PER_CLASS = 100  # training images a class the probes see at most (and a quarter as many to validate)
DOMAIN_PROBE_MIN_PER_CLASS = 10  # fewer say nothing: no probe
DOMAIN_SHARE = 0.05  # of the budget, for the probes' pass over the network (MNIST 50 a class at 64 px: 1.3-1.9 s)
SATURATED_SHARE = 0.5  # a full plan (largest size, target epochs, most members) using less than this is saturated
HEAD_MARGIN = 0.01  # multi_stage must beat the last stage's probe by this much validation accuracy


# --------------------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Throughput:
    """Measured speed at one image size and frozen depth, in images per second.

    Attributes:
        size: image side in pixels.
        depth: one of ``DEPTHS``.
        frozen_groups: parameter groups frozen at this depth.
        prefix_img_s: inference through the frozen prefix (computed once per image and view).
        train_img_s: a training step (forward, backward, update) of the part that trains.
        eval_img_s: inference through the part that trains (validation, every epoch).
        cached: whether the frozen prefix is cached (else every step runs the whole network).
    """

    size: int
    depth: str
    frozen_groups: int
    prefix_img_s: float
    train_img_s: float
    eval_img_s: float
    cached: bool = True
    backbone: str | None = None


@dataclass(frozen=True)
class Workload:
    """The data and fixed choices a plan is for."""

    n_train: int
    n_val: int
    classes: int
    native: int
    views: int = 4


def member_seconds(t: Throughput, w: Workload, epochs: int, augment: bool) -> tuple[float, float]:
    """``(cache seconds, seconds per epoch)`` of one member at ``t``."""
    views = w.views if augment and t.cached else 1
    cache_s = (w.n_train * views + w.n_val) / t.prefix_img_s if t.cached and t.prefix_img_s > 0 else 0.0
    epoch_s = w.n_train / t.train_img_s + w.n_val / t.eval_img_s
    return cache_s, epoch_s


def target_epochs(depth: str, augment: bool) -> int:
    """The epochs a member at ``depth`` trains before the time buys more members instead."""
    if depth == "linear_probe":
        return PROBE_EPOCHS
    return AUGMENTED_DEEP_EPOCHS if augment and depth == "most" else TARGET_EPOCHS


def lr_finder_seconds(t: Throughput) -> float:
    """The range test's seconds at ``t``: its steps (``models.lr_finder.NUM_ITER``) of 32 images."""
    from .lr_finder import NUM_ITER  # (here: the planner imports torch only where it runs it)

    return NUM_ITER * 32 / t.train_img_s


def could_plan(t: Throughput, w: Workload, train_s: float, epochs: int | None = None) -> bool:
    """Whether ``plan_recipe`` could choose row ``t`` for ``train_s`` seconds of training at all.

    Its cheapest use is one unaugmented member at the floor epochs (``epochs`` when kept), range
    test included, in ``THROUGHPUT_SAFETY`` of the time: past that, ``plan_recipe`` skips the row. The
    time only grows with the image size, so a depth whose row cannot be planned needs no larger size
    measured (``measure_throughput``).
    """
    floor = epochs or (PROBE_EPOCHS // 3 if t.depth == "linear_probe" else MIN_EPOCHS)
    cache_s, epoch_s = member_seconds(t, w, floor, augment=False)
    return SETUP_S + cache_s + floor * epoch_s + lr_finder_seconds(t) <= train_s * THROUGHPUT_SAFETY


def depth_for(per_class: float) -> tuple[str, str]:
    """The lecture's rule: the frozen depth for ``per_class`` training images per class, and why."""
    if per_class < PROBE_BELOW:
        return "linear_probe", (
            f"{per_class:.0f} training images per class (< {PROBE_BELOW}): only a new linear classifier trains on "
            "the pretrained features; anything more would overfit"
        )
    if per_class < TOP_STAGE_BELOW:
        return "top", (
            f"{per_class:.0f} training images per class ({PROBE_BELOW}-{TOP_STAGE_BELOW - 1}): the top stage "
            "and the classifier train, the rest keeps its pretrained weights"
        )
    if per_class < MOST_BELOW:
        return "most", (
            f"{per_class:.0f} training images per class ({TOP_STAGE_BELOW}-{MOST_BELOW - 1}): all but the "
            f"first {MOST_FROZEN} groups fine-tune"
        )
    return "all", f"{per_class:.0f} training images per class (>= {MOST_BELOW}): the whole network fine-tunes"


@dataclass
class Choice:
    """One planned recipe and its estimated seconds."""

    size: int
    depth: str
    epochs: int
    members: int
    augment: bool
    cache_s: float
    epoch_s: float
    lr_finder_s: float
    seconds: float
    fallback: bool = False  # nothing fitted: the cheapest recipe, for the deadline to stop


def _later_member(c: Choice, cache_shared: bool) -> tuple[float, float]:
    """``(cache seconds, seconds)`` of a member after the first one of plan ``c`` (one member planned).

    A later member builds its own cache only when its features differ (random weights). Augmented
    members share one set of views (``models.member``), but a member's cache time is still counted
    for them: on a slow day members of an augmented plan ran 1.5x slower than measured, and counting
    the shared cache as free planned members that were then skipped (docs/quality.md, fourth round).
    """
    cache_s = 0.0 if cache_shared and not c.augment else c.cache_s
    return cache_s, SETUP_S + cache_s + c.epochs * c.epoch_s


def _pixel_epochs(images: int, c: Choice) -> int:
    """Plan ``c``'s cost against the admission cap (``models.budget.job_cost``): images x side² x epochs x members."""
    return images * c.size * c.size * c.epochs * c.members


def _pair_epochs(c: Choice, seconds: float, cache_shared: bool) -> int | None:
    """The most epochs (``MIN_EPOCHS`` up to ``c``'s) at which two members of the augmented fine-tune
    ``c`` fit ``PAIR_SHARE`` of ``seconds`` at the measured speed; None when not even the floor does
    (or ``c`` is not such a fine-tune)."""
    if not (c.augment and c.depth == "most"):
        return None
    for e in range(max(c.epochs, MIN_EPOCHS), MIN_EPOCHS - 1, -1):
        one = replace(c, epochs=e)
        first = c.lr_finder_s + SETUP_S + c.cache_s + e * c.epoch_s
        if first + _later_member(one, cache_shared)[1] <= seconds * PAIR_SHARE:
            return e
    return None


def _members_in(c: Choice, seconds: float, cache_shared: bool) -> int:
    """Members of plan ``c`` (one member planned) that ``seconds`` buy at the measured speed, up to ``MAX_MEMBERS``.

    Training starts a member only when the last one's pace says it ends before the deadline
    (``models.training``), so a slower machine trains fewer, none cut short.
    """
    extra = int(max(seconds - c.seconds, 0.0) // _later_member(c, cache_shared)[1])
    return max(1, min(MAX_MEMBERS, 1 + extra))


def plan_recipe(
    table: list[Throughput],
    w: Workload,
    train_s: float,
    *,
    sizes: list[int] | None = None,
    depth: str | None = None,
    epochs: int | None = None,
    members: int | None = None,
    max_pixel_epochs: int | None = None,
    images: int | None = None,
    cache_shared: bool = True,
    augment: bool | None = None,
    pairs: bool = True,
) -> tuple[Choice, list[str]]:
    """Choose size, depth, epochs and members for ``train_s`` seconds of training (pure).

    Args:
        table: measured throughputs (every size x depth considered).
        w: the data.
        train_s: seconds available for training (budget minus measurement and reserve).
        sizes: allowed sizes (a kept ``image_size``: one); default: every size in ``table``.
        depth: a kept depth; default: the rule's (``depth_for``), made deeper if it cannot fit.
        epochs: kept epochs.
        members: kept members.
        max_pixel_epochs: the admission cap (``job_cost``) the plan must stay under.
        images: images in the dataset (for the cap).
        cache_shared: members after the first reuse its frozen-prefix cache when they train
            unaugmented (pretrained weights: ``models.training``); False: each builds its own.
        augment: light augmentation or not; default: the rule's (from ``AUGMENT_FROM`` images a class).
        pairs: where one member of the augmented fine-tune is bought, two of fewer epochs may be
            planned instead (``PAIR_SHARE``); False: not (the deeper step wants its full epochs).

    Returns:
        The choice and one line per decision, saying why.
    """
    per_class = w.n_train / max(w.classes, 1)
    aug_choice = augment
    why: list[str] = []
    full_s = train_s
    train_s = train_s * THROUGHPUT_SAFETY
    if depth is None:
        rule_depth, reason = depth_for(per_class)
        why.append(reason)
        ladder = list(DEPTHS[: DEPTHS.index(rule_depth) + 1])[::-1]  # the rule's, then ever less training
    else:
        ladder = [depth]
        why.append(f"frozen depth kept as set: {depth}")
    by_key = {(t.size, t.depth): t for t in table}
    allowed = sorted({t.size for t in table} if sizes is None else set(sizes))
    choice: Choice | None = None
    all_members = False
    for d in ladder:
        probe = d == "linear_probe"
        augment = (per_class >= AUGMENT_FROM if aug_choice is None else aug_choice) and not probe
        target = epochs or target_epochs(d, augment)
        floor = epochs or (PROBE_EPOCHS // 3 if probe else MIN_EPOCHS)
        fits: list[Choice] = []
        for size in allowed:
            t = by_key.get((size, d))
            if t is None:
                continue
            cache_s, epoch_s = member_seconds(t, w, target, augment)
            lr_s = lr_finder_seconds(t)
            one = SETUP_S + cache_s + target * epoch_s
            budget_one = train_s * (1.0 if members == 1 else FIRST_MEMBER_SHARE)
            e = target
            if one + lr_s > budget_one and epochs is None:
                # fewer epochs at this size, down to the floor; one member may then take all the time
                e = min(target, int((train_s - lr_s - SETUP_S - cache_s) // max(epoch_s, 1e-9)))
                if e < floor:
                    continue
            one = SETUP_S + cache_s + e * epoch_s
            if one + lr_s > train_s:
                continue
            fits.append(Choice(size, d, e, 1, augment, cache_s, epoch_s, lr_s, one + lr_s))
        if fits:
            # The largest size whose member trains the target epochs within its share (room for more
            # members); then the largest that trains them at all; failing that, the most epochs.
            # Under DEEPER_MIN_SIZE only when no larger size trains them (animals at 200 a class, the
            # top stage: 96 px with 1 member 0.9685, 64 px with 4 members 0.9535; docs/quality.md).
            trained = [c for c in fits if c.epochs == (epochs or target)]
            share = [c for c in trained if c.seconds <= train_s * FIRST_MEMBER_SHARE]
            large = [c for c in trained if c.size >= DEEPER_MIN_SIZE]
            # (of sizes that leave no room for more members, the smallest: it leaves the most)
            full = ([c for c in share if c.size >= DEEPER_MIN_SIZE] or large[:1] or share or trained)
            # Members before size: of those, the largest size at which the time buys every member (at
            # 180-600 s, 96-192 px with 4-5 members beat 192-224 px with 2-4: docs/quality.md), down to
            # DEEPER_MIN_SIZE (animals at 200 a class: 5 members at 64 px 0.9785, 3 at 96 px 0.9865).
            every = [c for c in full if c.size >= DEEPER_MIN_SIZE
                     and _members_in(c, full_s, cache_shared) >= (members or MAX_MEMBERS)]
            best = max(every or full, key=lambda c: c.size) if full else max(fits, key=lambda c: (c.epochs, -c.size))
            all_members = bool(every) and (members or MAX_MEMBERS) > 1
            if not full and d == ladder[0] and depth is None:
                # Squeezed below its epochs, the rule's depth still beats a shallower one that trains
                # all of them (200 a class, 75 s, 3 groups frozen at 64 px: MNIST 1 member of 6 epochs
                # 0.9675 against the top stage's 3 members of 12, 0.944; two members of 4 epochs, the
                # pair below, 0.9725; animals 0.967 with the pair against the top stage at 96 px 0.9685).
                why.append(f"{d} trains {best.epochs} of its {target} epochs in the {train_s:.0f} s planned for: "
                           "fewer epochs of the rule's depth beat a shallower depth's full ones")
            choice = best
            if d != ladder[0]:
                why.append(f"the rule's depth does not fit {train_s:.0f} s even at the smallest size: {d} instead")
            break
    if choice is None:
        # Nothing fits: the simplest recipe (a linear probe, unless a depth is kept) at its cheapest;
        # the deadline ends it in time with what it reached.
        rows = [t for t in table if (sizes is None or t.size in allowed) and t.depth in ladder]
        simplest = [t for t in rows if t.depth == ladder[-1]] or rows or table[:1]
        cheapest = min(simplest, key=lambda t: sum(member_seconds(t, w, 1, False)))
        cache_s, epoch_s = member_seconds(cheapest, w, 1, False)
        e = epochs or max(1, int((train_s - SETUP_S - cache_s) // max(epoch_s, 1e-9)))
        if epochs is None and cheapest.depth == "linear_probe" and cheapest.cached:
            # A probe's epochs on cached features cost next to nothing next to its cache: one epoch
            # would serve a barely trained head if the machine is faster than measured.
            e = max(e, PROBE_EPOCHS // 3)
        total = SETUP_S + cache_s + e * epoch_s
        choice = Choice(cheapest.size, cheapest.depth, e, 1, False, cache_s, epoch_s, 0.0, total, fallback=True)
        why.append(
            f"nothing fits {train_s:.0f} s at {MIN_EPOCHS} epochs: the cheapest recipe ({choice.size} px, "
            f"{choice.depth}), the deadline stops it in time"
        )
    elif all_members and choice.size < max(c.size for c in fits):
        why.append(
            f"{choice.size} px: the largest measured size at which the {full_s:.0f} s for training buy all "
            f"{members or MAX_MEMBERS} members of {choice.epochs} epochs at 100% of the measured speed (members "
            f"before size: larger images with fewer members did worse; cache {choice.cache_s:.1f} s, "
            f"{choice.epoch_s:.2f} s an epoch)"
        )
    else:
        why.append(
            f"{choice.size} px: the largest measured size at which one member trains {choice.epochs} epochs "
            f"in the {train_s:.0f} s planned for ({THROUGHPUT_SAFETY:.0%} of the measured speed over the "
            f"{full_s:.0f} s for training: a shared machine slows down; cache {choice.cache_s:.1f} s, "
            f"{choice.epoch_s:.2f} s an epoch)"
        )
    target = target_epochs(choice.depth, choice.augment)
    pair = (None if members is not None or epochs is not None or not pairs
            else _pair_epochs(choice, full_s, cache_shared))
    if pair is not None and max_pixel_epochs is not None and images is not None \
            and _pixel_epochs(images, replace(choice, epochs=pair, members=2)) > max_pixel_epochs:
        pair = None  # the cap would take the second member and leave the first with fewer epochs
    if pair is not None and choice.epochs >= target and _members_in(choice, full_s, cache_shared) > 1:
        pair = None  # members of all their epochs are bought anyway
    if pair is not None:
        why.append(
            f"2 members of {pair} epochs instead of 1 of {choice.epochs}: the time buys one member of the augmented "
            "fine-tune, or two of fewer epochs, and two are worth more (200 a class, 75 s: MNIST 0.9725 against "
            "0.9675, animals 0.967 against 0.959)"
        )
        choice.members, choice.epochs = 2, pair
    later_cache_s, per_member = _later_member(choice, cache_shared)
    if members is not None:
        choice.members = members
        why.append(f"members kept as set: {members}")
    elif pair is not None:
        pass  # two members of fewer epochs (above)
    elif choice.epochs < target:
        choice.members = 1
        why.append(f"1 member: the time buys {choice.epochs} epochs, and members are worth more epochs first")
    else:
        choice.members = _members_in(choice, full_s, cache_shared)  # at the measured speed
        why.append(
            f"{choice.members} member(s): each takes about {per_member:.1f} s, and an averaged ensemble is worth "
            f"more than a longer run once the epochs are enough (at most {MAX_MEMBERS}; a member that the last "
            "one's pace says would miss the deadline trains fewer epochs or is not started)"
        )
    if max_pixel_epochs is not None and images is not None:
        while _pixel_epochs(images, choice) > max_pixel_epochs and (choice.members > 1 or choice.epochs > 1):
            if choice.members > 1 and members is None:
                choice.members -= 1
            elif epochs is None and choice.epochs > 1:
                choice.epochs -= 1
            else:
                break
        if _pixel_epochs(images, choice) > max_pixel_epochs:
            why.append("the admission cap on pixel-epochs binds: the plan is over it with what the user kept")
        else:
            cost = _pixel_epochs(images, choice)
            why.append(f"within the admission cap of {max_pixel_epochs:.3g} pixel-epochs ({cost:.3g})")
    choice.seconds = choice.lr_finder_s + choice.cache_s - later_cache_s + choice.members * per_member
    return choice, why


# --------------------------------------------------------------------------- measuring


def freeze_of(depth: str, n_groups: int) -> dict[str, Any]:
    """The ``freeze`` section of a depth."""
    if depth == "linear_probe":
        return {"mode": "linear_probe"}
    if depth == "top":
        return {"mode": "first_n", "stages": max(n_groups - 2, 0)}
    if depth == "most":
        # The backbone at the head's lr, as issue #14's recipe trains it: a third of it scored 0.9355 on
        # MNIST at 50 a class against 0.9675 (64 px, 4 members, 180 s; docs/quality.md).
        return {"mode": "first_n", "stages": min(MOST_FROZEN, max(n_groups - 2, 0)), "backbone_lr_mult": 1.0}
    return {"mode": "none", "backbone_lr_mult": 0.3}


def best_of(
    fn: Callable[[], Any], reps: int, *, sync: Callable[[], Any] | None = None, max_reps: int | None = None,
    within_s: float = 0.0,
) -> float:
    """Seconds of the fastest of ``reps`` timed calls of ``fn``, after one warm-up call; more calls, up
    to ``max_reps``, while the timed calls so far took under ``within_s`` in all.

    The fastest, not the mean (as ``timeit`` advises): another process's burst of work during one
    call says nothing about this device, and a mean would plan the whole job for that burst (a plain
    job measured so once planned a one-epoch linear probe). THROUGHPUT_SAFETY covers steady load.
    """
    fn()  # warm-up (allocations, kernels)
    best, spent, done = math.inf, 0.0, 0
    while done < reps or (done < (max_reps or reps) and spent < within_s):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        took = time.perf_counter() - t0
        best, spent, done = min(best, took), spent + took, done + 1
    return best


def measure_throughput(
    images: np.ndarray,
    backbone: str,
    head_features: str,
    num_classes: int,
    sizes: list[int],
    depths: list[str],
    *,
    device: str | None = None,
    time_cap_s: float | None = None,
    log: Callable[[str], None] | None = None,
    batch_size: int = 32,
    plannable: Callable[[Throughput], bool] | None = None,
) -> list[Throughput]:
    """Time a batch of ``images`` (uint8 ``[N, S, S, 3]``, resized) at each size and depth.

    The training step is timed on ``batch_size`` images (the job's, at most ``MAX_MEASURE_BATCH``);
    inference in the chunks training runs it in (``models.runtime.inference_batch``).

    Sizes are measured in increasing order. A depth whose row ``plannable`` rejects (``could_plan``:
    too slow for the time) is not measured at larger sizes, which are slower still; measurement
    stops before a size whose predicted cost (the last size's, scaled by pixels and depths) would
    run past ``time_cap_s`` (sizes up to ``DEEPER_MIN_SIZE`` are always measured). Random weights: speed does not
    depend on them.
    """
    import torch
    import torch.nn.functional as F

    from .freezing import apply_freeze, parameter_groups
    from .heads import HeadConfig, create_classifier
    from .prefix import model_steps
    from .runtime import inference_batch, resolve_device

    dev = resolve_device(device)
    t_start = time.perf_counter()
    head = HeadConfig(features=head_features)
    # channels_last, as training runs it (models.member)
    model = create_classifier(backbone, weights="none", num_classes=num_classes, head=head).to(dev)
    model = model.to(memory_format=torch.channels_last)
    steps = model_steps(model)
    n_groups = len(parameter_groups(model))
    sample = np.ascontiguousarray(images[: min(batch_size, MAX_MEASURE_BATCH)])
    batch = torch.from_numpy(sample).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1.0
    y = torch.arange(len(batch), device=dev) % num_classes
    table: list[Throughput] = []

    def timed(fn: Callable[[], Any]) -> float:
        sync = torch.cuda.synchronize if dev.type == "cuda" else None
        return best_of(fn, MEASURE_REPS, sync=sync, max_reps=MEASURE_MAX_REPS, within_s=MEASURE_REPS_S)

    active = list(depths)
    last: tuple[int, int, float] | None = None  # size, depths measured at it, seconds it took
    for size in sorted(sizes):
        if not active:
            if log:
                log(f"planner: nothing measured from {size} px on (no depth there could fit the time)")
            break
        if time_cap_s is not None and last is not None and size > DEEPER_MIN_SIZE:
            # (up to DEEPER_MIN_SIZE always: the first size's time includes one-time setup, and 96 px is
            # the size plans prefer)
            prev_size, prev_depths, prev_s = last
            predicted = prev_s * (size / prev_size) ** 2 * len(active) / prev_depths
            if time.perf_counter() - t_start + predicted > time_cap_s:
                if log:
                    log(f"planner: throughput measurement stopped before {size} px (it would take about "
                        f"{predicted:.1f} s more than its time share has left)")
                break
        t_size, measured_here = time.perf_counter(), len(active)
        x = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.contiguous(memory_format=torch.channels_last)
        for depth in list(active):
            fs = freeze_of(depth, n_groups)
            apply_freeze(model, mode=fs["mode"], stages=fs.get("stages", 0), train_bn=False)
            prefix_s, train_s, eval_s, cached = time_depth(model, steps, x, y, timed, inference_batch(dev, size))
            n = len(x)
            table.append(
                Throughput(
                    size=size,
                    depth=depth,
                    frozen_groups=int(fs.get("stages", n_groups - 1 if depth == "linear_probe" else 0)),
                    prefix_img_s=round(n / prefix_s, 2) if prefix_s > 0 else 0.0,
                    train_img_s=round(n / max(train_s, 1e-9), 2),
                    eval_img_s=round(n / max(eval_s, 1e-9), 2),
                    cached=cached,
                    backbone=backbone,
                )
            )
            if plannable is not None and not plannable(table[-1]):
                active.remove(depth)
                if log and size < max(sizes):
                    log(f"planner: {depth} not measured above {size} px (one member would not fit the time there)")
        last = (size, measured_here, time.perf_counter() - t_size)
    return table


def time_depth(
    model: Any, steps: Any, x: Any, y: Any, timed: Callable[[Callable[[], Any]], float], chunk: int | None = None
) -> tuple[float, float, float, bool]:
    """Seconds a batch takes: frozen prefix (inference), training step and evaluation of the rest.

    Inference is timed as training runs it: in chunks of ``chunk`` images (``models.runtime.inference_batch``;
    default: the whole batch at once).
    """
    import torch
    import torch.nn.functional as F

    from .prefix import forward_steps, frozen_prefix

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    k = frozen_prefix(steps) if steps is not None else 0
    n = chunk or len(x)

    def infer(inputs: Any, start: int, end: int | None = None) -> list[Any]:
        if steps is None:
            return [model(inputs[s : s + n]) for s in range(0, len(inputs), n)]
        return [forward_steps(steps, inputs[s : s + n], start, end) for s in range(0, len(inputs), n)]

    model.eval()
    with torch.no_grad():
        h = torch.cat(infer(x, 0, k)) if steps is not None else x
        prefix_s = timed(lambda: infer(x, 0, k)) if k > 0 else 0.0
        eval_s = timed(lambda: infer(h, k))

    def train_step() -> None:
        model.train()
        logits = forward_steps(steps, h, k) if steps is not None else model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return prefix_s, timed(train_step), eval_s, k > 0


# --------------------------------------------------------------------------- head comparison


def _probe_acc(train_x: Any, train_y: Any, val_x: Any, val_y: Any, classes: int) -> tuple[float, float]:
    """Validation accuracy and loss of an L2-regularised linear probe fitted by L-BFGS on features."""
    import torch
    import torch.nn.functional as F

    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6
    xt, xv = (train_x - mean) / std, (val_x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same probe every time: a decision is taken on its figures
        lin = torch.nn.Linear(xt.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    wd = 1e-3

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), train_y) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = lin(xv)
        return float((logits.argmax(1) == val_y).float().mean()), float(F.cross_entropy(logits, val_y))


def compare_heads(
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    backbone: str,
    weights: str,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]],
    *,
    device: str | None = None,
) -> dict[str, Any]:
    """Linear probes on the last stage's features against several stages' joined, on validation."""
    import torch

    from .heads import HeadConfig, create_classifier
    from .runtime import inference_batch, resolve_device

    t0 = time.perf_counter()
    dev = resolve_device(device)
    classes = int(labels.max()) + 1
    model: Any = create_classifier(
        backbone, weights=weights, num_classes=classes, head=HeadConfig(features="multi_stage")
    ).to(dev).to(memory_format=torch.channels_last).eval()
    mean = torch.tensor(mean_std[0], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(mean_std[1], device=dev).view(1, 3, 1, 1)
    feats = []
    with torch.inference_mode():
        batch = inference_batch(dev, images.shape[1])
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch])).to(dev)
            x = ((x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
            feats.append(model.multi_stage_features(x).float().cpu())
    f = torch.cat(feats)
    last_width = int(model.num_features)
    y = torch.from_numpy(labels).long()
    tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    results = {}
    for name, cols in (("last", slice(f.shape[1] - last_width, None)), ("multi_stage", slice(None))):
        acc, loss = _probe_acc(f[tr][:, cols], y[tr], f[va][:, cols], y[va], classes)
        results[name] = {"val_acc": round(acc, 4), "val_loss": round(loss, 4), "features": int(f[:, cols].shape[1])}
    better = results["multi_stage"]["val_acc"] >= results["last"]["val_acc"] + HEAD_MARGIN or (
        results["multi_stage"]["val_acc"] >= results["last"]["val_acc"]
        and results["multi_stage"]["val_loss"] < results["last"]["val_loss"]
    )
    choice = "multi_stage" if better else "last"
    return {
        "choice": choice,
        "probes": results,
        "why": (
            f"linear probes on validation: last stage {results['last']['val_acc']:.3f}, several stages joined "
            f"{results['multi_stage']['val_acc']:.3f}: {choice}"
        ),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def domain_probe(
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    spec: TrainSpec,
    *,
    per_class: int = DOMAIN_PROBE_PER_CLASS,
    device: str | None = None,
) -> dict[str, Any]:
    """Whether the data looks unlike ImageNet: ``compare_heads`` on at most ``per_class`` training
    images a class, judged by ``UNLIKE_IMAGENET_LOSS_RATIO`` (the report's ``plan.domain``)."""
    from .zoo import preprocess_for

    rng = np.random.default_rng(spec.seed)
    train_rows = np.concatenate([
        rng.permutation(train_idx[labels[train_idx] == c])[:per_class] for c in np.unique(labels)
    ])
    val_rows = np.concatenate([
        rng.permutation(val_idx[labels[val_idx] == c])[: max(per_class // 4, 1)] for c in np.unique(labels)
    ])
    rows = np.concatenate([train_rows, val_rows])
    pre = preprocess_for(spec.backbone, images.shape[1])
    probes = compare_heads(
        images[rows], labels[rows], np.arange(len(train_rows)), np.arange(len(train_rows), len(rows)),
        spec.backbone, spec.weights, (pre.mean, pre.std), device=device,
    )
    last, multi = probes["probes"]["last"], probes["probes"]["multi_stage"]
    ratio = multi["val_loss"] / max(last["val_loss"], 1e-6)
    unlike = last["val_loss"] > PROBE_LOSS_FLOOR and ratio < UNLIKE_IMAGENET_LOSS_RATIO
    return {
        "probes": probes["probes"],
        "loss_ratio": round(ratio, 3),
        "unlike_imagenet": unlike,
        "seconds": probes["seconds"],
        "why": (
            f"linear probes at {images.shape[1]} px, validation loss: several stages joined {multi['val_loss']:.3f}, "
            f"the last stage {last['val_loss']:.3f} (ratio {ratio:.2f}): "
            + ("unlike ImageNet (earlier stages fit better: fine-tuning more of the network pays)" if unlike else
               f"like ImageNet (ratio >= {UNLIKE_IMAGENET_LOSS_RATIO}, or the last stage's loss under "
               f"{PROBE_LOSS_FLOOR}: its features fit)")
        ),
    }


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What the planner chose and why (the report's ``plan`` section)."""

    budget_s: float
    default_budget: bool
    device: str
    kept: list[str]
    planned: dict[str, Any]
    why: list[str]
    throughputs: list[Throughput]
    measure_seconds: float
    estimate_seconds: float
    head: dict[str, Any] | None = None
    domain: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    deadline: dict[str, Any] | None = None
    members_skipped: dict[str, Any] | None = None
    members_shortened: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughputs"] = [asdict(t) for t in self.throughputs]
        return d


def _judge_domain(
    images: np.ndarray,
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    spec: TrainSpec,
    *,
    probe_img_s: float,
    budget_s: float,
    device: str | None,
) -> dict[str, Any]:
    """``domain_probe`` within ``DOMAIN_SHARE`` of the budget at ``probe_img_s``; else why not (ImageNet-like)."""
    per_class = min(DOMAIN_PROBE_PER_CLASS, int(DOMAIN_SHARE * budget_s * probe_img_s / (1.25 * (labels.max() + 1))))
    if not (multi_stage_supported(spec.backbone) and spec.weights != "none" and not spec.ensemble.backbones):
        return {"unlike_imagenet": False, "why": "no domain probe (it needs pretrained EfficientNet features): "
                "the data is taken for ImageNet-like"}
    if per_class < DOMAIN_PROBE_MIN_PER_CLASS:
        return {"unlike_imagenet": False, "why": f"no domain probe ({DOMAIN_PROBE_MIN_PER_CLASS} images a class "
                f"would take over {DOMAIN_SHARE:.0%} of the budget): the data is taken for ImageNet-like"}
    return domain_probe(images, labels, split[0], split[1], spec, per_class=per_class, device=device)


def _sizes_for(backbone: str) -> list[int]:
    native = BACKBONES[backbone].input_size
    return [s for s in CANDIDATE_SIZES if s <= native] or [native]


def _candidate_sizes(spec: TrainSpec, keep: list[str]) -> list[int]:
    if _kept(keep, "image_size") and spec.image_size:
        return [spec.image_size]
    return _sizes_for(spec.backbone)


def _ladder_above(spec: TrainSpec, keep: list[str]) -> list[str]:
    """Larger bundled backbones the planner may move a job to: none when the user chose the network."""
    from .weights import bundled_available

    if (_kept(keep, "backbone") or spec.weights != "bundled" or spec.ensemble.backbones
            or spec.backbone not in BACKBONE_LADDER or _kept(keep, "image_size")):
        return []
    above = BACKBONE_LADDER[BACKBONE_LADDER.index(spec.backbone) + 1:]
    return [b for b in above if bundled_available(b)]


def _deeper_than(depth: str) -> str | None:
    """The next depth that trains more of the network, short of all of it (never from a probe)."""
    if depth not in ("top",):
        return None
    return DEPTHS[DEPTHS.index(depth) + 1]


def _saturated(
    choice: Choice, train_s: float, sizes: list[int], kept_epochs: int | None, kept_members: int | None
) -> bool:
    """The plan has everything more time could buy on this backbone and still leaves most of the time."""
    return (
        choice.size == max(sizes)
        and choice.depth != "linear_probe"
        and choice.epochs >= (kept_epochs or target_epochs(choice.depth, choice.augment))
        and choice.members >= (kept_members or MAX_MEMBERS)
        and choice.seconds < SATURATED_SHARE * train_s
    )


def _trains_enough(c: Choice, depth: str, train_s: float, kept_epochs: int | None, min_members: int) -> bool:
    """Whether plan ``c`` is at ``depth`` and trains its target epochs with ``min_members`` in ``train_s``."""
    return (c.depth == depth and c.seconds <= train_s
            and c.epochs >= (kept_epochs or target_epochs(c.depth, c.augment)) and c.members >= min_members)


@dataclass
class _Job:
    """What one ``plan_job`` call plans for: the data, the fields the user kept, the clock."""

    images: np.ndarray
    labels: np.ndarray
    spec: TrainSpec
    keep: list[str]
    split: tuple[np.ndarray, np.ndarray]
    budget_s: float
    started: float
    device: str | None
    say: Callable[[str], None]
    max_pixel_epochs: int | None
    kept_depth: str | None
    kept_epochs: int | None
    kept_members: int | None
    head_features: str

    @property
    def reserve(self) -> float:
        return max(RESERVE_MIN_S, RESERVE_SHARE * self.budget_s)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def train_s(self) -> float:
        """Seconds left for training: the budget less what planning took and the reserve."""
        return max(self.budget_s - self.elapsed() - self.reserve, 0.0)

    def measure_left(self) -> float:
        """What is left of the measuring share of the budget."""
        return max(MEASURE_SHARE * self.budget_s - self.elapsed(), 0.0)

    def plannable(self, w: Workload) -> Callable[[Throughput], bool]:
        """Whether a measured row could still be planned in the time left (``could_plan``)."""
        return lambda t: could_plan(t, w, self.train_s(), self.kept_epochs)

    def measure(
        self, backbone: str, sizes: list[int], depths: list[str], cap_s: float, w: Workload
    ) -> list[Throughput]:
        return measure_throughput(
            self.images, backbone, self.head_features, int(self.labels.max()) + 1, sizes, depths,
            device=self.device, time_cap_s=cap_s, log=self.say, batch_size=self.spec.batch_size,
            plannable=self.plannable(w),
        )

    def plan_for(
        self, rows: list[Throughput], work: Workload, seconds: float, depth: str | None = None,
        aug: bool | None = None, only: list[int] | None = None, epochs: int | None = None,
        pairs: bool = True,
    ) -> tuple[Choice, list[str]]:
        """``plan_recipe`` with what the user kept."""
        spec = self.spec
        return plan_recipe(
            rows, work, seconds,
            sizes=only,
            depth=depth or self.kept_depth,
            augment=aug,
            epochs=epochs or self.kept_epochs,
            members=self.kept_members,
            max_pixel_epochs=self.max_pixel_epochs,
            images=len(self.labels),
            # one backbone, pretrained, unaugmented (unless the planner adds it): models.training shares the cache
            cache_shared=spec.weights != "none" and not spec.ensemble.backbones
            and not (_kept(self.keep, "augment") and spec.augment.enabled),
            # (a snapshot's members are cycles of one run, a mixed ensemble's are set: no pair there)
            pairs=pairs and not spec.ensemble.snapshot and not spec.ensemble.backbones,
        )

    def domain(self, table: list[Throughput], sizes: list[int]) -> dict[str, Any]:
        """``_judge_domain`` at the smallest size, at the speed ``table`` gives for a pass over the network."""
        speed = _network_speed(table, min(sizes))
        return _judge_domain(self.images, self.labels, self.split, self.spec, probe_img_s=speed,
                             budget_s=self.budget_s, device=self.device)


def _network_speed(table: list[Throughput], size: int) -> float:
    """Images a second through the whole network at ``size`` (the domain probe's pass), from ``table``:
    the linear probe's prefix, the top stage's (nearly all of it), or a deeper depth's prefix and rest."""
    for depth in ("linear_probe", "top"):
        row = next((t for t in table if t.depth == depth and t.size == size and t.prefix_img_s > 0), None)
        if row is not None:
            return row.prefix_img_s
    row = next((t for t in table if t.size == size and t.prefix_img_s > 0 and t.eval_img_s > 0), None)
    return 1.0 / (1.0 / row.prefix_img_s + 1.0 / row.eval_img_s) if row is not None else 0.0


def _deeper_step(
    job: _Job, table: list[Throughput], w: Workload, choice: Choice, why: list[str], sizes: list[int]
) -> tuple[Choice, list[str], dict[str, Any] | None]:
    """One step deeper than the top stage, with light augmentation, where it wins (issue #14's recipe's shape).

    When the top stage trains its epochs, the deeper depth is measured from ``DEEPER_MIN_SIZE`` up
    (within what is left of the measuring share; ``table`` gains its rows) and planned; if it trains
    its epochs with ``DEEPER_MIN_MEMBERS`` members, the domain probe says how many it needs (2 on data
    unlike ImageNet, ``DEEPER_MIN_MEMBERS_LIKE_IMAGENET`` otherwise). Returns the choice, its why
    lines and the probe's verdict (None when it did not run).
    """
    deeper = _deeper_than(choice.depth)
    deep_sizes = [s for s in sizes if s >= DEEPER_MIN_SIZE]
    kept_epochs, kept_members = job.kept_epochs, job.kept_members
    if (deeper is None or not deep_sizes or job.kept_depth is not None or _kept(job.keep, "augment")
            or choice.epochs < (kept_epochs or target_epochs(choice.depth, choice.augment))):
        return choice, why, None
    # (the rule's own depth may have been measured already: at 150-499 a class it is this one, up to
    # the first size too slow for the time, or as far as the measuring share went)
    too_slow = min((t.size for t in table if t.depth == deeper and not job.plannable(w)(t)), default=math.inf)
    unmeasured = [s for s in deep_sizes
                  if s < too_slow and not any((t.size, t.depth) == (s, deeper) for t in table)]
    if unmeasured and job.measure_left() > 0:
        table += job.measure(job.spec.backbone, unmeasured, [deeper], job.measure_left(), w)
    if not any(t.depth == deeper and t.size in deep_sizes for t in table):
        return choice, why + [f"{choice.depth} kept: {deeper} was not measured (the measuring share of the "
                              "budget was spent, or it is too slow for the time)"], None

    def deep_plan(seconds: float) -> tuple[Choice, list[str]]:
        # Members first (6 epochs each); once they are all bought, epochs again: 12-epoch members at a
        # smaller size beat 6-epoch ones at the largest (600 s, docs/quality.md).
        short = job.plan_for(table, w, seconds, depth=deeper, aug=True, only=deep_sizes, pairs=False)
        if kept_epochs is not None or short[0].members < (kept_members or MAX_MEMBERS):
            return short
        long = job.plan_for(table, w, seconds, depth=deeper, aug=True, only=deep_sizes, epochs=TARGET_EPOCHS,
                            pairs=False)
        if not _trains_enough(long[0], deeper, seconds, TARGET_EPOCHS,
                              min(LONG_DEEPER_MEMBERS, kept_members or LONG_DEEPER_MEMBERS)):
            return short
        return long[0], long[1] + [f"{TARGET_EPOCHS} epochs a member: at {AUGMENTED_DEEP_EPOCHS} the members "
                                   f"were all bought, and {long[0].members} of {TARGET_EPOCHS} epochs fit"]

    train_s = job.train_s()
    deep, deep_why = deep_plan(train_s)
    need = min(DEEPER_MIN_MEMBERS, kept_members or DEEPER_MIN_MEMBERS)
    domain: dict[str, Any] | None = None
    if _trains_enough(deep, deeper, train_s, kept_epochs, need):
        # Enough for data unlike ImageNet: is it? (the probes' time then comes off the plan's)
        domain = job.domain(table, sizes)
        why = why + [domain["why"]]
        train_s = job.train_s()
        deep, deep_why = deep_plan(train_s)
        enough = DEEPER_MIN_MEMBERS if domain["unlike_imagenet"] else DEEPER_MIN_MEMBERS_LIKE_IMAGENET
        need = min(enough, kept_members or enough)
    if deep.fallback:  # (its epochs were sized for the whole time, and it did not fit that)
        return choice, why + [f"{choice.depth} kept: {deeper} does not fit the time at {MIN_EPOCHS} epochs "
                              f"from {DEEPER_MIN_SIZE} px"], domain
    if not _trains_enough(deep, deeper, train_s, kept_epochs, need):
        return choice, why + [f"{choice.depth} kept: {deeper} would train {deep.epochs} epochs at {deep.size} px, "
                              f"{deep.members} member(s) in the time (it needs {need})"], domain
    return deep, why + [
        f"{deeper} with light augmentation: it trains {deep.epochs} epochs with {deep.members} members "
        f"in the {train_s:.0f} s (with {need} members an augmented fine-tune of more of the network beats "
        f"or ties the {choice.depth} stage's plan on such data: docs/quality.md)"
    ] + deep_why[1:], domain


@dataclass
class _BackboneStep:
    """What trying a larger backbone gave: its why lines, and the plan, data and sizes on it if it moved."""

    why: list[str]
    moved: tuple[Choice, Workload, list[int]] | None = None


def _larger_backbone(
    job: _Job, table: list[Throughput], w: Workload, choice: Choice, backbones: tuple[str, str], sizes: list[int]
) -> _BackboneStep | None:
    """The plan on the larger of ``backbones`` (current, bigger), when the current plan has everything more
    time could buy on its own (else None)."""
    current, bigger = backbones
    train_s = job.train_s()
    if not _saturated(choice, train_s, sizes, job.kept_epochs, job.kept_members):
        return None
    # Sizes from the one planned up to the largest the job was admitted at (its decoded bytes,
    # models.budget.job_cost, count the first backbone's sizes): the bigger network is for time to spare.
    big_sizes = [s for s in _sizes_for(bigger) if choice.size <= s <= max(sizes)]
    if not big_sizes or job.measure_left() <= 0:
        return None
    big_w = Workload(n_train=w.n_train, n_val=w.n_val, classes=w.classes,
                     native=BACKBONES[bigger].input_size, views=w.views)
    rows = job.measure(bigger, big_sizes, [choice.depth], job.measure_left(), big_w)
    train_s = job.train_s()
    big, big_why = job.plan_for(rows, big_w, train_s)
    table += rows
    if not _trains_enough(big, choice.depth, train_s, job.kept_epochs, min(2, job.kept_members or 2)):
        return _BackboneStep([f"backbone kept: {bigger} would train {big.epochs} epochs, {big.members} member(s) "
                              "in the time"])
    return _BackboneStep([
        f"backbone {bigger}: the {current} plan used only {choice.seconds:.0f} s of {train_s:.0f} s at its "
        f"largest size, most epochs and members; a larger pretrained network is what the time can buy"
    ] + big_why, (big, big_w, big_sizes))


def plan_job(
    images: np.ndarray,
    labels: np.ndarray,
    spec: TrainSpec,
    budget_s: float,
    *,
    default_budget: bool = False,
    device: str | None = None,
    max_pixel_epochs: int | None = None,
    log: Callable[[str], None] | None = None,
    started: float | None = None,
) -> tuple[TrainSpec, Plan]:
    """Measure and plan: the recipe to train (a validated ``TrainSpec``) and the plan.

    Args:
        images: the dataset decoded at any size (a batch is resized to each candidate).
        labels: its labels.
        spec: the job; its explicit fields are kept.
        budget_s: seconds for the whole job.
        default_budget: the budget is the device's default (the job set none).
        device: where training will run.
        max_pixel_epochs: the admission cap.
        log: progress lines.
        started: ``time.perf_counter()`` when the job's clock started (default: now).
    """
    from .data import stratified_split
    from .freezing import parameter_groups
    from .heads import HeadConfig, create_classifier
    from .runtime import resolve_device

    t0 = started if started is not None else time.perf_counter()
    say = log or (lambda _m: None)
    keep = explicit_fields(spec)
    classes = int(labels.max()) + 1
    train_idx, val_idx = stratified_split(labels, spec.val_fraction, spec.seed)
    w = Workload(n_train=len(train_idx), n_val=len(val_idx), classes=classes,
                 native=BACKBONES[spec.backbone].input_size, views=spec.cache.views)
    sizes = _candidate_sizes(spec, keep)
    n_groups = len(parameter_groups(
        create_classifier(spec.backbone, weights="none", num_classes=classes, head=HeadConfig())
    ))
    kept_depth: str | None = None
    if _kept(keep, "freeze"):
        f = spec.freeze
        partial = "most" if f.stages < n_groups - 2 else "top"
        kept_depth = {"linear_probe": "linear_probe", "none": "all"}.get(f.mode, partial)
    job = _Job(
        images=images, labels=labels, spec=spec, keep=keep, split=(train_idx, val_idx), budget_s=budget_s,
        started=t0, device=device, say=say, max_pixel_epochs=max_pixel_epochs, kept_depth=kept_depth,
        kept_epochs=spec.epochs if _kept(keep, "epochs") else None,
        kept_members=spec.ensemble.members if _kept(keep, "ensemble.members") else None,
        head_features=spec.head_features if _kept(keep, "head_features") else "last",
    )
    # The rule's depth (or the kept one) first: shallower depths are measured only when it cannot be
    # planned (at 200 a class, 75 s: measuring 10 s -> 1.5 s).
    rule = kept_depth or depth_for(w.n_train / classes)[0]
    table = job.measure(spec.backbone, sizes, [rule], MEASURE_SHARE * budget_s, w)
    choice, why = job.plan_for(table, w, job.train_s())
    shallower = [] if kept_depth else list(DEPTHS[: DEPTHS.index(rule)])
    if shallower and choice.fallback:
        table += job.measure(spec.backbone, sizes, shallower, job.measure_left(), w)
        choice, why = job.plan_for(table, w, job.train_s())
    choice, why, domain = _deeper_step(job, table, w, choice, why, sizes)
    backbone = spec.backbone
    for bigger in _ladder_above(spec, keep):
        step = _larger_backbone(job, table, w, choice, (backbone, bigger), sizes)
        if step is None:
            break
        why = why + step.why
        if step.moved is None:
            break
        (choice, w, sizes), backbone = step.moved, bigger
    measured = time.perf_counter() - t0
    d = spec.model_dump(mode="json")
    planned: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if _kept(keep, path):
            return
        node = d
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
        planned[path] = value

    if backbone != spec.backbone:
        put("backbone", backbone)
        n_groups = len(parameter_groups(
            create_classifier(backbone, weights="none", num_classes=classes, head=HeadConfig())
        ))
    put("image_size", choice.size)
    if not _kept(keep, "freeze"):
        d["freeze"] = {**d["freeze"], **freeze_of(choice.depth, n_groups)}
        planned["freeze"] = freeze_of(choice.depth, n_groups)
    put("epochs", choice.epochs)
    put("patience", max(3, choice.epochs // 3))
    members, why = _members_up_to(job, choice, why)
    put("ensemble.members", members)
    if not _kept(keep, "augment"):
        d["augment"] = {"preset": "light" if choice.augment else "none"}
        planned["augment"] = d["augment"]
        why.append(
            "light augmentation (cached views)" if choice.augment
            else f"no augmentation: under {AUGMENT_FROM} images a class the cache stays exact and epochs cheap"
        )
    put("head_dropout", 0.0 if choice.depth == "linear_probe" else 0.2)
    put("schedule.name", "cosine")
    put("schedule.warmup_epochs", 1)
    if d["optimizer"]["name"] != "lbfgs":
        put("optimizer.lr", LR_AUTO)
    if not _kept(keep, "head_features"):
        put("head_features", "last")
    plan = Plan(
        budget_s=budget_s,
        default_budget=default_budget,
        device=str(resolve_device(device)),
        kept=keep,
        planned=planned,
        why=why,
        throughputs=table,
        measure_seconds=round(measured, 2),
        estimate_seconds=round(measured + choice.seconds, 1),
        domain=domain,
    )
    return TrainSpec.model_validate(d), plan


def _members_up_to(job: _Job, choice: Choice, why: list[str]) -> tuple[int, list[str]]:
    """The members to plan: ``choice``'s, and up to ``MAX_MEMBERS`` where the run may find time for more.

    The plan's members fit the measured speed, and the measuring is noisy: one plain job on MNIST at
    200 a class measured the machine 1.6x slower than the next, planned one member and ended at 40 s
    of 75. Members past the plan's cost nothing when they do not fit: the run starts one only while
    the pace so far says it ends before the deadline, the last on a shorter schedule
    (``models.training``). Not for members the user kept, snapshots or mixed backbones (the member
    count means something else there), a linear probe (its members see the same features), a plan
    that does not fit (``fallback``), nor past the admission cap.
    """
    spec = job.spec
    if (job.kept_members is not None or spec.ensemble.snapshot or spec.ensemble.backbones
            or choice.depth == "linear_probe" or choice.fallback or choice.members >= MAX_MEMBERS):
        return choice.members, why
    most = MAX_MEMBERS
    if job.max_pixel_epochs is not None:
        most = min(most, job.max_pixel_epochs // max(_pixel_epochs(len(job.images), replace(choice, members=1)), 1))
    if most <= choice.members:
        return choice.members, why
    cap = "" if job.max_pixel_epochs is None else (
        f"; within the admission cap ({_pixel_epochs(len(job.images), replace(choice, members=most)):.3g} "
        "pixel-epochs)")
    return most, why + [
        f"up to {most} members: {choice.members} {'fits' if choice.members == 1 else 'fit'} the measured speed; "
        "the run starts each further one only "
        f"while the pace so far says it ends before the deadline (a machine faster than measured gets them){cap}"
    ]


def choose_head(
    data: Any, spec: TrainSpec, plan: Plan, budget_left_s: float, *, device: str | None = None
) -> TrainSpec:
    """For a planned linear probe: the better of the last-stage and multi-stage heads on validation."""
    from .data import stratified_split
    from .zoo import preprocess_for

    if spec.freeze.mode != "linear_probe" or _kept(plan.kept, "head_features"):
        return spec
    if not multi_stage_supported(spec.backbone) or spec.ensemble.backbones:
        plan.why.append("head: last stage (the multi-stage head needs an EfficientNet)")
        return spec
    # One pass over the data: skip it when it would take a large share of what is left.
    est = next((len(data.labels) / t.prefix_img_s for t in plan.throughputs
                if t.size == spec.image_size and t.depth == "linear_probe" and t.prefix_img_s > 0), math.inf)
    if est > 0.25 * budget_left_s:
        plan.why.append(f"head: last stage (comparing heads would take ~{est:.0f} s of {budget_left_s:.0f} s left)")
        return spec
    train_idx, val_idx = stratified_split(data.labels, spec.val_fraction, spec.seed)
    pre = preprocess_for(spec.backbone, spec.image_size)
    plan.head = compare_heads(
        data.images, data.labels, train_idx, val_idx, spec.backbone, spec.weights, (pre.mean, pre.std), device=device
    )
    plan.why.append(plan.head["why"])
    plan.planned["head_features"] = plan.head["choice"]
    return spec.model_copy(update={"head_features": plan.head["choice"]})


def fit_budgeted(
    decode: Callable[[int], Any],
    spec: TrainSpec,
    budget_s: float,
    *,
    default_budget: bool = False,
    device: str | None = None,
    num_threads: int | None = None,
    hooks: Any = None,
    cache: Any = None,
    max_pixel_epochs: int | None = None,
    started: float | None = None,
    on_plan: Callable[[TrainSpec, Plan], None] | None = None,
) -> tuple[Any, TrainSpec]:
    """Plan ``spec`` for ``budget_s`` seconds, train it, and end in time: ``(TrainResult, trained spec)``.

    Args:
        decode: the dataset decoded at a given side (``ImageArray``), e.g. ``models.data.load_folder``.
        spec: the job.
        budget_s: seconds for everything from ``started`` on (measuring, planning, training, evaluating).
        default_budget: the budget is the device's default (for the report).
        device, num_threads, cache: as for ``models.training.train``.
        hooks: ``TrainHooks`` (its ``deadline`` is set here).
        max_pixel_epochs: the admission cap the plan must respect.
        started: ``time.perf_counter()`` when the job's clock started (default: now).
        on_plan: called with the planned spec and the plan before training starts.
    """
    from dataclasses import replace

    from .runtime import torch_threads
    from .training import TrainHooks, train

    t0 = started if started is not None else time.perf_counter()
    hooks = hooks or TrainHooks()
    say = hooks.log or (lambda _m: None)
    sizes = _candidate_sizes(spec, explicit_fields(spec))
    first = decode(min(sizes))
    with torch_threads(num_threads or 0) if num_threads else nullcontext():
        planned, plan = plan_job(
            first.images, first.labels, spec, budget_s, default_budget=default_budget, device=device,
            max_pixel_epochs=max_pixel_epochs, log=say, started=t0,
        )
        data = first if planned.image_size == min(sizes) else decode(int(planned.image_size or min(sizes)))
        reserve = max(RESERVE_MIN_S, RESERVE_SHARE * budget_s)
        deadline = t0 + budget_s - reserve
        planned = choose_head(data, planned, plan, deadline - time.perf_counter(), device=device)
    plan.spec = planned.model_dump(mode="json")
    say(
        f"plan for {budget_s:.0f} s: {planned.image_size} px, freeze {planned.freeze.mode}"
        f"{'' if planned.freeze.mode != 'first_n' else f' {planned.freeze.stages}'}, {planned.epochs} epochs, "
        f"{planned.ensemble.members} member(s), head {planned.head_features}; estimated {plan.estimate_seconds:.0f} s"
    )
    if on_plan is not None:
        on_plan(planned, plan)
    result = train(
        data, planned, hooks=replace(hooks, deadline=deadline), device=device, num_threads=num_threads, cache=cache
    )
    plan.seconds = round(time.perf_counter() - t0, 2)
    plan.deadline = result.sections.get("deadline")
    plan.members_skipped = result.sections.get("members_skipped")
    plan.members_shortened = result.sections.get("members_shortened")
    result.sections["plan"] = plan.to_dict()
    return result, planned
