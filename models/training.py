"""The training loop: fine-tune one or more backbones on a decoded image array.

``train`` is the whole job: seeded stratified split, then for each ensemble member the setup
of ``models.member`` and its epochs (train an epoch, validate, offer the best weights, take a
snapshot, hand the state to the checkpoint callback), with early stopping; an L-BFGS member runs
``models.lbfgs.train_lbfgs_member`` instead. ``models.results.finish_ensemble`` then averages and
evaluates the members on the same validation split.

After every epoch ``train`` can hand its whole state (``TrainState``) to a ``checkpoint`` hook,
and it can start from such a state (``resume``) instead of from scratch; ``models.checkpoint``
keeps the state on disk.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .budget import _kept, explicit_fields
from .checkpoint import TrainState, resume_problem, rng_state, run_fingerprint, set_rng_state
from .data import ImageArray, check_trainable, stratified_split
from .errors import TrainingCancelled, TrainingError
from .freezing import FreezeReport, apply_freeze, gradual_freeze, set_train_mode
from .lbfgs import train_lbfgs_member
from .lr_finder import LrFinderResult, lr_range_test, max_lr_for
from .member import Best, MemberSetup, finished_member, rebuild_optimizer, setup_member, state_copy
from .optim import cycle_ends
from .prefix import (
    CacheBounds,
    CacheInputs,
    CachePlan,
    FeatureCache,
    Step,
    build_cache,
    cache_problem,
    forward_steps,
    frozen_prefix,
    model_steps,
    set_prefix_eval,
)
from .results import RunOutcome, TrainedMember, TrainResult, finish_ensemble
from .runtime import available_cpus, inference_batch, resolve_device, torch_threads
from .spec import LR_AUTO, EpochRecord, FreezeSpec, TrainSpec
from .transforms import augment_batch, normalize_batch, normalize_transform
from .zoo import Preprocess, preprocess_for

# optimizer.lr 'auto': the lr members are built with until the finder has run (never trained with).
LR_PLACEHOLDER = 0.01
# A member is started under a deadline only if the last one's time, times this, is left (a busier machine).
MEMBER_PACE_MARGIN = 1.1
# Where a whole member no longer fits, one of fewer epochs (a complete, shorter schedule) is trained if
# at least this share of the recipe's epochs fits; else the member is not started.
SHORT_MEMBER_MIN_SHARE = 0.5
# Schedules laid over the member's epochs, so that fewer epochs make a whole, shorter one (the others
# are indexed by epoch: fewer epochs would cut them off, as the deadline would).
SHORTENABLE_SCHEDULES = ("cosine", "one_cycle")


@dataclass(frozen=True)
class TrainHooks:
    """What ``train`` tells its caller as it goes, and asks it.

    Attributes:
        on_epoch: called with each member's ``EpochRecord`` after every epoch; ``member`` and
            ``epoch`` are 0-based indices (display ``epoch + 1``).
        should_stop: polled between batches; returning True cancels training.
        log: receives human-readable progress lines.
        checkpoint: called with the ``TrainState`` at the end of every epoch, after ``on_epoch``
            (``models.checkpoint.save_state`` writes it to disk). It must not keep the state's
            tensors: they belong to the live model and optimizer.
        deadline: a ``time.perf_counter()`` instant (a time budget): once it has passed, training
            stops between two batches and keeps the best weights so far: the member in training
            ends with its best epoch, later members are not trained. It is armed once the first
            member has finished one epoch past its warm-up, so a run always has a model to serve
            that trained at its learning rate (a warm-up epoch alone leaves a random head).
    """

    on_epoch: Callable[[EpochRecord], None] | None = None
    should_stop: Callable[[], bool] | None = None
    log: Callable[[str], None] | None = None
    checkpoint: Callable[[TrainState], None] | None = None
    deadline: float | None = None


class DeadlineReached(Exception):
    """The time budget's deadline passed (``TrainHooks.deadline``); caught inside ``train``."""


def train(
    data: ImageArray,
    spec: TrainSpec,
    *,
    hooks: TrainHooks | None = None,
    device: str | None = None,
    num_threads: int | None = None,
    resume: TrainState | None = None,
    cache: CacheBounds | None = None,
) -> TrainResult:
    """Fine-tune ``spec``'s ensemble on ``data``.

    Args:
        data: decoded images at the spec's image size (``preprocess_for(spec.backbone, spec.image_size)``).
        spec: the recipe.
        hooks: progress, cancellation, log and checkpoint callbacks (``TrainHooks``).
        device: ``cuda``, ``cpu``, ... ; ``None`` or ``auto`` picks a GPU when there is one. On CUDA
            the forward pass runs under autocast (bf16 where supported, else fp16 with a GradScaler).
        num_threads: CPU threads for torch during training; default: torch's current setting, capped
            at the cores this process may use.
        resume: a ``TrainState`` to continue from (``models.checkpoint.load_state``): the run goes on
            after its epoch and, on the same device and thread count, ends exactly as an uninterrupted
            one. One that does not belong to ``data`` and ``spec`` (``resume_problem``) is logged and
            ignored: training starts from the beginning.
        cache: where the frozen-prefix feature cache may live (memory, then spilled to disk).

    Returns:
        The ``TrainResult`` with every member's best-epoch weights and the ensemble's validation metrics.

    Raises:
        TrainingError: the data cannot be split or training diverged.
        TrainingCancelled: ``should_stop`` returned True.
        WeightsUnavailableError: the spec's weights cannot be obtained here.
    """
    start = time.perf_counter()
    check_trainable(data)
    shared = preprocess_for(spec.backbone, spec.image_size)
    if data.images.shape[1:3] != (shared.image_size, shared.image_size):
        raise ValueError(
            f"images are {data.images.shape[1]}x{data.images.shape[2]} px but the spec trains at "
            f"{shared.image_size} px: decode them with preprocess_for(spec.backbone, spec.image_size)"
        )
    run = _Run(data, spec, resolve_device(device), hooks or TrainHooks(), resume, cache or CacheBounds())
    run.check_stop()
    # Default: torch's own setting (a caller's set_num_threads wins), capped at the usable cores.
    threads = num_threads or min(torch.get_num_threads(), available_cpus())
    with torch_threads(threads):
        run.log(
            f"training {spec.ensemble.members} member(s) on {run.device} ({run.amp_dtype or 'fp32'}, "
            f"{threads} threads), {len(run.train_idx)} train / {len(run.val_idx)} val images, "
            f"{len(data.classes)} classes, {shared.image_size} px"
        )
        try:
            if spec.ensemble.snapshot:
                if len(run.members) < spec.ensemble.members:
                    run.train_member(0, spec.backbone, shared, run.resume)
            else:
                for i, backbone in enumerate(spec.member_backbones()):
                    if i < len(run.members):
                        continue
                    if run.deadline_hit is not None:
                        break
                    state = run.resume if run.resume is not None and run.resume.member == i else None
                    # A resumed member goes on with the epochs it started with (a shortened one's too).
                    epochs = run.resumed_epochs(state) if state is not None else run.epochs_that_fit(i)
                    if epochs is None:
                        break
                    with run.member_epochs(epochs):
                        run.train_member(i, backbone, shared, state)
                    run.note_shortened(i, epochs)
        except DeadlineReached:
            run.note_deadline(len(run.members), None)
        finally:
            run.close_shared_cache()
        if run.deadline_hit is not None:
            run.log(f"time budget's deadline reached: {run.deadline_hit['note']}")
    outcome = RunOutcome(
        classes=list(data.classes),
        labels=data.labels,
        train_idx=run.train_idx,
        val_idx=run.val_idx,
        members=run.members,
        member_probs=run.member_probs,
        history=run.history,
        applied=run.applied,
        preprocess=shared,
        device=str(run.device),
        amp=str(run.amp_dtype).removeprefix("torch.") if run.amp_dtype else None,
        started=start,
        names=list(data.names),
    )
    ends = cycle_ends(spec.epochs, spec.ensemble.members) if spec.ensemble.snapshot else None
    if ends is not None and len(run.members) < spec.ensemble.members:
        ends = ends[: len(run.members)]
    result = finish_ensemble(outcome, greedy=spec.ensemble.greedy, snapshot_ends=ends, log=run.log)
    if run.lr_found is not None:
        result.sections["lr_finder"] = run.lr_found.to_dict()
    if run.deadline_hit is not None:
        result.sections["deadline"] = run.deadline_hit
    if run.members_skipped is not None:
        result.sections["members_skipped"] = run.members_skipped
    if run.members_shortened is not None:
        result.sections["members_shortened"] = run.members_shortened
    return result


class _Run:
    """Shared state of one ``train`` call: data on the device, split, hooks, precision."""

    def __init__(
        self,
        data: ImageArray,
        spec: TrainSpec,
        device: torch.device,
        hooks: TrainHooks,
        resume: TrainState | None,
        cache_bounds: CacheBounds,
    ) -> None:
        self.spec = spec
        self.device = device
        self.on_epoch = hooks.on_epoch
        self.should_stop = hooks.should_stop
        self.deadline = hooks.deadline
        # Armed once a member has weights to serve (see TrainHooks.deadline).
        self.deadline_armed = False
        self.deadline_hit: dict[str, Any] | None = None
        # With a deadline: what each member took (less what a later member does not repeat: the range
        # test, a shared cache's build), so a member that would not finish in time is not started.
        self.member_seconds: dict[str, float] = {}  # by backbone: the last member's, at the recipe's epochs
        self.epoch_seconds: dict[str, float] = {}  # by backbone: the last member's seconds an epoch
        self.shared_build_s = 0.0
        self.members_skipped: dict[str, Any] | None = None
        self.members_shortened: dict[str, Any] | None = None
        self.short_note: str | None = None  # why the member being trained is shortened (epochs_that_fit)
        self.recipe_epochs = spec.epochs  # a shortened member trains fewer (epochs_that_fit)
        # optimizer.lr 'auto': members are built at a placeholder lr, the finder sets the real one.
        self.lr_auto = spec.optimizer.lr == LR_AUTO
        if self.lr_auto:
            spec = spec.model_copy(update={"optimizer": spec.optimizer.model_copy(update={"lr": LR_PLACEHOLDER})})
            self.spec = spec
        self.lr_found: LrFinderResult | None = None
        self.log: Callable[[str], None] = hooks.log or (lambda _msg: None)
        self.checkpoint = hooks.checkpoint
        self.cache_bounds = cache_bounds
        self.shared_cache: tuple[tuple[Any, ...], FeatureCache, CachePlan] | None = None
        self.num_classes = len(data.classes)
        self.history: list[EpochRecord] = []
        self.members: list[TrainedMember] = []
        self.member_probs: list[np.ndarray] = []
        self.applied: list[dict[str, Any]] = []
        self.train_idx, self.val_idx = stratified_split(data.labels, spec.val_fraction, spec.seed)
        self.fingerprint = run_fingerprint(data, spec) if self.checkpoint is not None or resume is not None else {}
        self.resume: TrainState | None = None
        if resume is not None:
            problem = resume_problem(resume, data, spec, fingerprint=self.fingerprint)
            if problem is None:
                self.resume = resume
                self.history = list(resume.history)
                self.members = list(resume.finished)
                self.member_probs = list(resume.finished_probs)
            else:
                self.log(f"not resuming from the checkpoint: {problem}; training from the start")
        # On a GPU the whole uint8 array lives there, so augmentation runs there too.
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.train_labels = self.labels[torch.from_numpy(self.train_idx).to(device)]
        self.val_labels = self.labels[torch.from_numpy(self.val_idx).to(device)]
        self.per_class = len(self.train_idx) / max(self.num_classes, 1)
        self.cuda = device.type == "cuda"
        self.amp_dtype: torch.dtype | None = None
        if self.cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled("training cancelled")
        if self.deadline is not None and self.deadline_armed and time.perf_counter() > self.deadline:
            raise DeadlineReached

    def epochs_that_fit(self, i: int) -> int | None:
        """The epochs member ``i`` trains under the deadline: the recipe's, fewer, or None (not started).

        At the pace of the last member of its backbone, a member that would not end before the deadline
        is not started as it is: a member the deadline cuts short is rarely worth its place
        (``_MemberLoop.cut_short``). It trains a complete, shorter schedule instead (its learning rate
        decays over the epochs it has) when at least ``SHORT_MEMBER_MIN_SHARE`` of the recipe's epochs
        fit, its schedule is one of ``SHORTENABLE_SCHEDULES`` and the user did not set the epochs;
        else the run ends with the members it has. The planner can therefore plan members at the
        measured speed and let the run keep what fits.
        """
        full = self.recipe_epochs
        if self.deadline is None or not self.member_seconds:
            return full
        backbone = self.spec.member_backbones()[i]
        # A backbone not trained yet (a mixed ensemble): the slowest pace seen, to be safe, and no shortening.
        need = self.member_seconds.get(backbone, max(self.member_seconds.values())) * MEMBER_PACE_MARGIN
        left = self.deadline - time.perf_counter()
        if left >= need:
            return full
        planned = self.spec.ensemble.members
        epoch_s = self.epoch_seconds.get(backbone)
        if epoch_s is not None and epoch_s > 0 and self.shortenable:
            setup_s = max(self.member_seconds[backbone] - full * epoch_s, 0.0)
            fits = math.floor((left / MEMBER_PACE_MARGIN - setup_s) / epoch_s)
            least = max(math.ceil(SHORT_MEMBER_MIN_SHARE * full), self.spec.schedule.warmup_epochs + 2)
            if least <= fits < full:
                self.short_note = (f"member {i + 1} of {planned} trains {fits} of {full} epochs (a shorter schedule): "
                                   f"a whole member takes about {need:.0f} s and {max(left, 0.0):.0f} s were left "
                                   "before the deadline")
                self.log(f"time budget: {self.short_note}")
                return fits
        self.members_skipped = {
            "planned": planned,
            "trained": i,
            "member_s": round(need, 1),
            "left_s": round(max(left, 0.0), 1),
            "note": f"member {i + 1} of {planned} not started: a member takes about {need:.0f} s and "
            f"{max(left, 0.0):.0f} s were left before the deadline",
        }
        self.log(f"time budget: {self.members_skipped['note']}")
        return None

    @property
    def shortenable(self) -> bool:
        """Whether a member may train fewer epochs than the recipe's (``epochs_that_fit``)."""
        return (self.spec.schedule.name in SHORTENABLE_SCHEDULES
                and not _kept(explicit_fields(self.spec), "epochs"))

    def note_shortened(self, i: int, epochs: int) -> None:
        """Record member ``i`` as shortened to ``epochs`` once it has joined the ensemble (the report)."""
        note, self.short_note = self.short_note, None
        if epochs >= self.recipe_epochs or len(self.members) <= i:
            return  # trained all its epochs, or the deadline or cut_short left it out
        note = note or f"member {i + 1} trained {epochs} of {self.recipe_epochs} epochs (resumed from a checkpoint)"
        earlier = self.members_shortened
        self.members_shortened = {
            "members": [*(earlier["members"] if earlier else []), {"member": i, "epochs": epochs}],
            "planned_epochs": self.recipe_epochs,
            "note": f"{earlier['note']}; {note}" if earlier else note,
        }

    def resumed_epochs(self, state: TrainState) -> int:
        """The epochs of the member a checkpoint resumes: those it started with (a shortened one's too)."""
        return self.recipe_epochs if state.member_epochs is None else state.member_epochs

    @contextlib.contextmanager
    def member_epochs(self, epochs: int) -> Iterator[None]:
        """Train the member inside with ``epochs`` epochs (its schedule, loop and checkpoints follow)."""
        if epochs == self.spec.epochs:
            yield
            return
        self.spec = self.spec.model_copy(update={"epochs": epochs})
        try:
            yield
        finally:
            self.spec = self.spec.model_copy(update={"epochs": self.recipe_epochs})

    def note_deadline(self, member: int, epoch: int | None) -> None:
        """Record where the deadline stopped the run (once)."""
        if self.deadline_hit is None:
            where = f"in member {member + 1}" + (f", epoch {epoch + 1}" if epoch is not None else "")
            self.deadline_hit = {
                "member": member,
                "epoch": epoch,
                "note": f"stopped {where}; every member trained so far is kept with its best weights",
            }

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def input(self, dataset_idx: np.ndarray, pre: Preprocess, augment: Any = None) -> torch.Tensor:
        """The model input for these images: normalised, augmented when ``augment`` is given."""
        idx = torch.from_numpy(dataset_idx).to(self.device)
        if augment is None:
            x = normalize_batch(self.images[idx], pre, self.device)
        else:
            x = normalize_transform(pre)(augment_batch(self.images[idx].permute(0, 3, 1, 2), augment))
        return x.contiguous(memory_format=torch.channels_last)  # as the model (models.member)

    def evaluate(
        self,
        model: nn.Module,
        pre: Preprocess,
        steps: list[Step] | None = None,
        cache: FeatureCache | None = None,
        cached: int = 0,
    ) -> tuple[float, float, np.ndarray]:
        """Validation loss, accuracy and probabilities ``[V, C]`` (from cached features when given)."""
        model.eval()
        probs, loss_sum = [], 0.0
        with torch.inference_mode():
            batch = inference_batch(self.device, pre.image_size)
            for start in range(0, len(self.val_idx), batch):
                rows = np.arange(start, min(start + batch, len(self.val_idx)))
                with self.autocast():
                    if cache is not None and steps is not None:
                        out = forward_steps(steps, cache.val_batch(rows), cached)
                    else:
                        out = model(self.input(self.val_idx[rows], pre))
                logits = out.float()
                y = self.val_labels[torch.from_numpy(rows).to(self.device)]
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                probs.append(logits.softmax(dim=-1).cpu())
        p = torch.cat(probs).numpy()
        y_all = self.val_labels.cpu().numpy()
        return loss_sum / len(self.val_idx), float((p.argmax(1) == y_all).mean()), p

    def cache_for(
        self, steps: list[Step] | None, n: int, fs: FreezeSpec, pre: Preprocess, augment: Any, seed: int,
        share: tuple[Any, ...] | None = None,
    ) -> tuple[FeatureCache | None, CachePlan]:
        """The frozen-prefix feature cache of a member, or None and why not.

        With ``share`` (what makes two members' prefix features equal), the run keeps the cache and
        hands it to the next member with the same ``share`` instead of building it again.
        """
        if share is not None and self.shared_cache is not None and self.shared_cache[0] == share:
            self.log("frozen-prefix cache: the previous member's (same backbone, prefix and images)")
            return self.shared_cache[1], self.shared_cache[2]
        if share is not None:
            self.close_shared_cache()  # before the build: never two caches in memory at once
        t0 = time.perf_counter()
        cache, plan = self._build_cache(steps, n, fs, pre, augment, seed)
        if share is not None and cache is not None:
            self.shared_cache = (share, cache, plan)
            self.shared_build_s = time.perf_counter() - t0
        return cache, plan

    def close_shared_cache(self) -> None:
        if self.shared_cache is not None:
            self.shared_cache[1].close()
            self.shared_cache = None

    def _build_cache(
        self, steps: list[Step] | None, n: int, fs: FreezeSpec, pre: Preprocess, augment: Any, seed: int
    ) -> tuple[FeatureCache | None, CachePlan]:
        spec = self.spec
        problem = cache_problem(
            family_supported=steps is not None,
            mode=spec.cache.mode,
            train_bn=fs.train_bn,
            mixes=spec.augment.mixes,
            prefix_steps=n,
        )
        if problem is not None or steps is None:
            return None, CachePlan("off", problem or "no steps")
        views = spec.cache.views if spec.augment.enabled else 1

        def train_inputs(view: int, rows: np.ndarray) -> torch.Tensor:
            # Augmented views are drawn under a fixed seed (below): a resumed run rebuilds the same ones.
            return self.input(self.train_idx[rows], pre, augment)

        t0 = time.perf_counter()
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 7919 + 17)
            cache, plan = build_cache(
                steps,
                n,
                inputs=CacheInputs(
                    train=train_inputs,
                    val=lambda rows: self.input(self.val_idx[rows], pre),
                    n_train=len(self.train_idx),
                    n_val=len(self.val_idx),
                    views=views,
                ),
                device=self.device,
                bounds=self.cache_bounds,
                batch=inference_batch(self.device, pre.image_size),
                autocast=self.autocast if self.cuda else None,
                should_stop=self.check_stop,
            )
        if cache is not None:
            self.log(f"frozen-prefix cache ({plan.path}): {plan.reason}; built in {time.perf_counter() - t0:.1f}s")
        return cache, plan

    def train_member(self, i: int, backbone: str, shared: Preprocess, resume: TrainState | None = None) -> None:
        """Train member ``i`` (or, for a snapshot ensemble, every snapshot) into ``self.members``."""
        t0, lr_s, cache_before = time.perf_counter(), 0.0, self.shared_cache
        try:
            m = setup_member(self, i, backbone, shared, resume.model if resume is not None else None)
        except DeadlineReached:
            self.note_deadline(i, None)  # nothing of this member trained yet: it is left out
            return
        try:
            if m.optimizer is not None and self.lr_auto and resume is None:
                t_lr = time.perf_counter()
                self.find_lr(m)
                lr_s = time.perf_counter() - t_lr
            t_loop = time.perf_counter()
            if m.optimizer is None:
                train_lbfgs_member(self, m)
            else:
                _MemberLoop(self, m, resume).run()
        except DeadlineReached:
            self.note_deadline(i, None)
            return
        finally:
            m.close()
        self.applied.append(m.applied)
        if resume is None:
            # Its setup (a later member that reuses a shared cache does not rebuild it), then its epochs
            # at this member's pace, as many as the recipe's (one that patience stopped early says so).
            # (in a mixed ensemble the next member of this backbone finds another's cache: it rebuilds)
            built_shared = (self.shared_cache is not None and self.shared_cache is not cache_before
                            and not self.spec.ensemble.backbones)
            setup_s = t_loop - t0 - lr_s - (self.shared_build_s if built_shared else 0.0)
            loop_s = time.perf_counter() - t_loop
            ran = int(m.applied.get("epochs_run") or 0)
            if m.optimizer is not None and ran > 0:
                self.epoch_seconds[backbone] = loop_s / ran
                epochs_s = loop_s * self.recipe_epochs / ran
            else:
                epochs_s = loop_s
            self.member_seconds[backbone] = setup_s + max(epochs_s, loop_s)

    def find_lr(self, m: MemberSetup) -> None:
        """``optimizer.lr: 'auto'``: the range test on member ``m`` (the first), then its real optimizer."""
        spec = self.spec
        if self.lr_found is None:
            assert m.optimizer is not None
            steps, cache = m.steps, m.cache
            set_train_mode(m.model, m.freeze)
            no_grad_to = frozen_prefix(steps) if steps is not None else 0
            if steps is not None and not m.transfer.train_bn:
                set_prefix_eval(steps, no_grad_to)

            def step_loss(rows: np.ndarray) -> torch.Tensor:
                y = self.train_labels[torch.from_numpy(rows).to(self.device)]
                with self.autocast():
                    logits = _forward_train(self, m, rows, 0, no_grad_to)
                return cast(torch.Tensor, m.criterion(logits.float(), y))

            self.lr_found = lr_range_test(
                m.model,
                m.optimizer,
                step_loss,
                n_train=len(self.train_idx),
                batch_size=spec.batch_size,
                rng=np.random.default_rng(m.seed + 104729),
                base_lr=spec.optimizer.lr_value(),
                should_stop=self.check_stop,
                max_lr=max_lr_for(spec.optimizer.name, fine_tune=spec.freeze.mode != "linear_probe"),
            )
            del cache
            self.log(
                f"lr finder: {self.lr_found.iterations} steps from {self.lr_found.start_lr:g} "
                f"({self.lr_found.stopped}): lr {self.lr_found.lr:.3g} by {self.lr_found.method}"
            )
            self.spec = spec = spec.model_copy(
                update={"optimizer": spec.optimizer.model_copy(update={"lr": self.lr_found.lr})}
            )
        rebuild_optimizer(self, m)
        m.applied["lr_finder"] = {"lr": self.lr_found.lr, "method": self.lr_found.method}


def _forward_train(
    run: _Run, m: MemberSetup, rows: np.ndarray, view: int, no_grad_to: int, *, mix: bool = False
) -> Any:
    """Logits of training ``rows`` (from the feature cache when the member has one); with ``mix``,
    ``(logits, target)`` after mixup/cutmix."""
    steps, cache = m.steps, m.cache
    y = run.train_labels[torch.from_numpy(rows).to(run.device)]
    target: torch.Tensor = y
    if cache is not None and steps is not None:
        h, at = cache.train_batch(view, rows), m.n_cache
    else:
        h, at = run.input(run.train_idx[rows], m.pre, m.augment), 0
        if mix and m.mixer is not None:
            h, target = m.mixer(h, y)
    if steps is None:
        logits = m.model(h)
    else:
        if no_grad_to > at:
            with torch.no_grad():
                h = forward_steps(steps, h, at, no_grad_to)
            at = no_grad_to
        logits = forward_steps(steps, h, at)
    return (logits, target) if mix else logits


class _MemberLoop:
    """The epochs of one gradient-trained member: a few named steps over its ``MemberSetup``."""

    def __init__(self, run: _Run, m: MemberSetup, resume: TrainState | None) -> None:
        spec = run.spec
        self.run_, self.m, self.spec = run, m, spec
        assert m.optimizer is not None
        self.optimizer: torch.optim.Optimizer = m.optimizer
        self.snapshot = spec.ensemble.snapshot
        self.serve = spec.ensemble.serve if m.ema is not None else "raw"
        self.ends = cycle_ends(spec.epochs, spec.ensemble.members) if self.snapshot else []
        self.best = Best(spec.monitor)
        self.epochs_run, self.start = 0, 0
        self.last_val_loss: float | None = None
        if resume is not None:
            self._resume_from(resume)
        self.ema_steps = model_steps(m.ema.module) if m.ema is not None and m.steps is not None else None
        self.frozen_depth = m.freeze.frozen_groups

    def _resume_from(self, state: TrainState) -> None:
        m, spec = self.m, self.spec
        m.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        m.scheduler.load_state_dict(state.scheduler)
        if m.scaler is not None and state.scaler is not None:
            m.scaler.load_state_dict(state.scaler)
        if m.ema is not None and state.ema is not None:
            m.ema.module.load_state_dict(state.ema)
        self.best.restore(state)
        self.epochs_run = state.epoch + 1
        self.start = spec.epochs if state.member_done else state.epoch + 1
        self.last_val_loss = next((r.val_loss for r in reversed(state.history) if r.member == m.index), None)
        set_rng_state(state.rng, m.rng)
        self.run_.log(f"member {m.index + 1}: resumed after epoch {state.epoch + 1}/{spec.epochs} from a checkpoint")

    def run(self) -> None:
        run, m, spec = self.run_, self.m, self.spec
        for epoch in range(self.start, spec.epochs):
            t0 = time.perf_counter()
            try:
                run.check_stop()
                record = self.train_epoch(epoch)
            except DeadlineReached:
                self.stop_at_deadline(epoch)
                break
            self.last_val_loss = record.val_loss
            self.epochs_run = epoch + 1
            self.offer_best(record)
            # Armed once the member has trained an epoch past its warm-up: a warm-up epoch starts near
            # lr 0, and weights from it alone are a random head (below chance; issue #14).
            if self.epochs_run > min(spec.schedule.warmup_epochs, spec.epochs - 1):
                run.deadline_armed = True
            record.seconds = time.perf_counter() - t0
            if self.snapshot and epoch in self.ends:
                self.take_snapshot(record)
            run.log(
                f"member {m.index + 1} epoch {epoch + 1}/{spec.epochs}: lr {record.lr:.2e} "
                f"train loss {record.train_loss:.4f} acc {record.train_acc:.3f} | "
                f"val loss {record.val_loss:.4f} acc {record.val_acc:.3f}"
                + (f" | ema acc {record.extra['ema_val_acc']:.3f}" if m.ema is not None else "")
                + f" ({record.seconds:.1f}s)"
            )
            if run.on_epoch is not None:
                run.on_epoch(record)
            run.history.append(record)
            stop = not self.snapshot and spec.patience is not None and self.best.since >= spec.patience
            if run.checkpoint is not None:
                run.checkpoint(self.state_for_checkpoint(epoch, done=stop or epoch == spec.epochs - 1))
            if stop:
                run.log(
                    f"member {m.index + 1}: no improvement in {spec.monitor} for {self.best.since} epochs, "
                    "stopping early"
                )
                break
        m.applied.update(epochs_run=self.epochs_run, best_epoch=self.best.epoch, served=self.best.kind)
        if self.snapshot and not run.members and self.best.score is not None:
            # Stopped by the deadline before the first cycle ended: its best weights are the one snapshot.
            run.members.append(finished_member(run, m, self.best.state, self.best, self.epochs_run, self.best.kind))
            run.member_probs.append(self.best.probs)
        if not self.snapshot:
            if self.cut_short():
                return
            run.members.append(finished_member(run, m, self.best.state, self.best, self.epochs_run, self.best.kind))
            run.member_probs.append(self.best.probs)

    def cut_short(self) -> bool:
        """Whether the deadline cut this member short of being worth its place in the ensemble.

        A member the deadline stopped is left out when another member is kept and it finished no
        epoch, or its best validation accuracy is below theirs: averaging in a half-trained member
        (still at a high lr) makes the ensemble worse than the members it has.
        """
        run, m = self.run_, self.m
        if "stopped_by_deadline" not in m.applied or not run.members:
            return False
        kept = max(member.val_acc for member in run.members)
        acc = self.best.acc
        if self.epochs_run > 0 and acc >= kept:
            return False
        m.applied["left_out"] = (
            f"stopped by the deadline after {self.epochs_run} epoch(s) at validation accuracy {acc:.3f}, "
            f"below the kept members' {kept:.3f}"
        )
        run.log(f"member {m.index + 1}: {m.applied['left_out']}: left out")
        return True

    def _unfreeze(self, epoch: int) -> FreezeReport:
        """The gradual-unfreezing depth of ``epoch`` (other strategies keep theirs)."""
        m = self.m
        if m.transfer.mode == "gradual":
            mode, stages = gradual_freeze(m.transfer, epoch, m.n_groups)
            m.freeze = apply_freeze(m.model, mode=mode, stages=stages, train_bn=m.transfer.train_bn)
            if m.freeze.frozen_groups != self.frozen_depth:
                self.frozen_depth = m.freeze.frozen_groups
                self.run_.log(
                    f"member {m.index + 1} epoch {epoch + 1}: gradual unfreezing, frozen now: "
                    f"{', '.join(self.frozen_depth) or '-'} ({m.freeze.trainable_params:,} trainable)"
                )
        return m.freeze

    def train_epoch(self, epoch: int) -> EpochRecord:
        """One pass over the training images, then validation: the epoch's record (seconds still 0)."""
        run, m, spec, optimizer = self.run_, self.m, self.spec, self.optimizer
        t0 = time.perf_counter()
        freeze = self._unfreeze(epoch)
        m.scheduler.step(epoch, self.last_val_loss)
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        set_train_mode(m.model, freeze)
        steps, cache = m.steps, m.cache
        # Every leading step frozen right now runs without autograd (and, with frozen BN, in eval).
        no_grad_to = frozen_prefix(steps) if steps is not None else 0
        if steps is not None and not m.transfer.train_bn:
            set_prefix_eval(steps, no_grad_to)
        # Members share the cache's augmented views (models.member): each starts at its own one (a
        # member's own cache, of random weights, is cycled the same way).
        view = (epoch + m.index) % len(cache.train) if cache is not None else 0
        n_train = len(run.train_idx)
        loss_sum, correct = 0.0, 0
        # array_split keeps batch sizes within one of each other: no 1-image batch for BatchNorm.
        for rows in np.array_split(m.rng.permutation(n_train), max(1, math.ceil(n_train / spec.batch_size))):
            run.check_stop()
            y = run.train_labels[torch.from_numpy(rows).to(run.device)]
            target: torch.Tensor = y
            with run.autocast():
                logits, target = _forward_train(run, m, rows, view, no_grad_to, mix=True)
            loss = m.criterion(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            if m.scaler is not None:
                m.scaler.scale(loss).backward()
                m.scaler.step(optimizer)
                m.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if m.ema is not None:
                m.ema.update(m.model)
            loss_sum += float(loss.detach()) * len(rows)
            correct += int((logits.detach().argmax(dim=1) == y).sum())
        train_loss = loss_sum / n_train
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"training diverged (loss {train_loss}) in epoch {epoch + 1} of member {m.index + 1} "
                f"({m.backbone}); lower the learning rate (now {spec.optimizer.lr})"
            )
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, probs = run.evaluate(m.model, m.pre, steps, cache, m.n_cache)
        self.probs = probs
        return EpochRecord(
            member=m.index,
            epoch=epoch,
            train_loss=train_loss,
            train_acc=correct / n_train,
            val_loss=val_loss,
            val_acc=val_acc,
            lr=lrs[m.head_group],
            seconds=0.0,
            extra={
                "train_images_per_s": n_train / max(train_seconds, 1e-9),
                "lr_min": min(lrs),
                "trainable_params": float(freeze.trainable_params),
                "epochs": float(spec.epochs),  # this member's (a time budget may shorten one: epochs_that_fit)
            },
        )

    def stop_at_deadline(self, epoch: int) -> None:
        """The deadline passed in ``epoch``: keep the best weights so far (this epoch's if none yet)."""
        run, m = self.run_, self.m
        if self.best.score is None:
            loss, acc, probs = run.evaluate(m.model, m.pre, m.steps, m.cache, m.n_cache)
            self.probs = probs
            self.best.offer(epoch, "raw", acc, loss, probs, m.model)
        m.applied["stopped_by_deadline"] = {"epoch": epoch, "epochs_done": self.epochs_run}
        run.note_deadline(m.index, epoch)

    def offer_best(self, record: EpochRecord) -> None:
        """Keep this epoch's weights (raw or EMA, as served) if they beat the best so far."""
        m, best, epoch = self.m, self.best, record.epoch
        improved = False
        if self.serve in ("raw", "best"):
            improved |= best.offer(epoch, "raw", record.val_acc, record.val_loss, self.probs, m.model)
        self.ema_probs = None
        if m.ema is not None:
            e_loss, e_acc, e_probs = self.run_.evaluate(m.ema.module, m.pre, self.ema_steps, m.cache, m.n_cache)
            record.extra.update(ema_val_acc=e_acc, ema_val_loss=e_loss)
            self.ema_probs = e_probs
            if self.serve in ("ema", "best"):
                improved |= best.offer(epoch, "ema", e_acc, e_loss, e_probs, m.ema.module)
        best.since = 0 if improved else best.since + 1
        record.extra["best"] = float(best.epoch == epoch)

    def take_snapshot(self, record: EpochRecord) -> None:
        """A snapshot member: the weights at the end of its cycle (the EMA's when serve='ema')."""
        run, m, epoch = self.run_, self.m, record.epoch
        k = self.ends.index(epoch)
        use_ema = m.ema is not None and self.serve == "ema"
        snap = Best(self.spec.monitor, epoch=epoch, acc=record.val_acc, loss=record.val_loss, probs=self.probs)
        if use_ema:
            snap.acc, snap.loss = record.extra["ema_val_acc"], record.extra["ema_val_loss"]
            assert self.ema_probs is not None
            snap.probs = self.ema_probs
        weights = state_copy(m.ema.module if use_ema else m.model)
        run.members.append(
            finished_member(run, m, weights, snap, epoch + 1, "ema snapshot" if use_ema else "snapshot")
        )
        run.member_probs.append(snap.probs.copy())  # never shares memory with best.probs
        run.log(f"snapshot {k + 1}/{len(self.ends)} at the end of epoch {epoch + 1}: val acc {snap.acc:.3f}")

    def state_for_checkpoint(self, epoch: int, *, done: bool) -> TrainState:
        """Where the run stands now: enough to carry on as if it never stopped."""
        run, m, best = self.run_, self.m, self.best
        return TrainState(
            member=m.index,
            epoch=epoch,
            member_done=done,
            fingerprint=run.fingerprint,
            train_idx=run.train_idx,
            val_idx=run.val_idx,
            model=m.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=m.scheduler.state_dict(),
            scaler=m.scaler.state_dict() if m.scaler is not None else None,
            best_state=best.state,
            best_epoch=best.epoch,
            best_acc=best.acc,
            best_loss=best.loss,
            best_probs=best.probs,
            since_best=best.since,
            rng=rng_state(m.rng),
            finished=list(run.members),
            finished_probs=list(run.member_probs),
            history=list(run.history),
            ema=m.ema.module.state_dict() if m.ema is not None else None,
            best_kind=best.kind,
            member_epochs=self.spec.epochs,
        )
