"""The frozen-prefix cache: steps equal the model, cached and uncached paths agree exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from models.artifact import load_predictor, save_artifact
from models.data import ImageArray
from models.ensemble import Ensemble
from models.freezing import apply_freeze, set_train_mode
from models.prefix import (
    CacheBounds,
    CacheInputs,
    build_cache,
    cache_problem,
    forward_steps,
    frozen_prefix,
    model_steps,
    set_prefix_eval,
)
from models.spec import TrainSpec
from models.training import train
from models.transforms import normalize_batch

FAMILIES = ["test_efficientnet", "mobilenetv3_large_100", "resnet18", "convnext_tiny"]


@pytest.mark.parametrize("name", FAMILIES)
def test_steps_compose_to_the_model(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, drop_rate=0.3).eval()
    steps = model_steps(model)
    assert steps is not None and steps[-1].name == "classifier" and steps[-2].name == "pool"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        for k in range(len(steps)):
            got = forward_steps(steps, forward_steps(steps, x, 0, k), k)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_family_has_no_steps() -> None:
    model = timm.create_model("test_vit", num_classes=3)
    assert model_steps(model) is None
    assert "not split" in (cache_problem(family_supported=False, mode="auto", train_bn=False, mixes=False,
                                         prefix_steps=3) or "")


def _frozen_model(stages: int) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", num_classes=3, drop_rate=0.0)
    report = apply_freeze(model, mode="first_n", stages=stages, train_bn=False)
    steps = model_steps(model)
    assert steps is not None
    set_train_mode(model, report)
    return model, steps


def test_cached_and_uncached_paths_give_the_same_loss_and_gradients() -> None:
    model, steps = _frozen_model(stages=3)
    n = frozen_prefix(steps)
    assert n == 3  # stem, blocks.0, blocks.1
    set_prefix_eval(steps, n)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def grads(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full = grads(model(x))  # the obvious loop: the whole model on every step
    with torch.inference_mode():
        cached = forward_steps(steps, x, 0, n)
    fast = grads(forward_steps(steps, cached.clone(), n))
    assert full.keys() == fast.keys() and full
    assert not any(k.startswith(("conv_stem", "blocks.0", "blocks.1.")) for k in fast)
    for k in full:
        torch.testing.assert_close(fast[k], full[k], rtol=1e-5, atol=1e-6)


def test_frozen_batchnorm_statistics_do_not_move() -> None:
    model, steps = _frozen_model(stages=3)
    set_prefix_eval(steps, frozen_prefix(steps))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(8, 3, 32, 32))
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("bn1", "blocks.0", "blocks.1."))]
    moving = [k for k in before if k.startswith("blocks.3")]
    assert frozen and moving
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in moving)


def _cache(steps: list, n: int, *, memory: int, disk: int, spill: Path | None, views: int = 1):
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def inputs(rows: np.ndarray) -> torch.Tensor:
        return images[torch.from_numpy(rows)]

    return build_cache(
        steps, n, inputs=CacheInputs(lambda v, rows: inputs(rows) + v, inputs, n_train=10, n_val=10, views=views),
        device=torch.device("cpu"), bounds=CacheBounds(memory, disk, spill), batch=4,
    ), images


def test_cache_memory_disk_and_off(tmp_path: Path) -> None:
    model, steps = _frozen_model(stages=3)
    model.eval()
    (mem, plan), images = _cache(steps, 3, memory=1 << 30, disk=0, spill=None, views=2)
    assert plan.path == "memory" and plan.views == 2 and plan.prefix == "blocks.1"
    with torch.no_grad():
        want = forward_steps(steps, images[:4] + 1, 0, 3)
    assert mem is not None
    torch.testing.assert_close(mem.train_batch(1, np.arange(4)), want)
    per_image = plan.bytes // 30

    # Too little memory for two views: one view in memory beats recomputing.
    (one, plan1), _ = _cache(steps, 3, memory=per_image * 25, disk=0, spill=None, views=2)
    assert plan1.path == "memory" and plan1.views == 1 and "2 views asked" in plan1.reason

    # Not even one view fits: spill to disk, same features, nothing left behind after close.
    (disk, plan2), _ = _cache(steps, 3, memory=per_image, disk=1 << 30, spill=tmp_path, views=2)
    assert plan2.path == "disk" and plan2.views == 2 and disk is not None
    rows = np.array([3, 0, 2, 1])
    torch.testing.assert_close(disk.train_batch(1, rows), mem.train_batch(1, rows))
    assert any(tmp_path.iterdir())
    disk.close()
    assert not any(tmp_path.iterdir())

    (none, plan3), _ = _cache(steps, 3, memory=per_image, disk=per_image, spill=tmp_path)
    assert none is None and plan3.path == "off" and "memory bound" in plan3.reason


def test_training_with_and_without_the_cache_is_the_same(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]
) -> None:
    spec = tiny_spec(freeze={"mode": "first_n", "stages": 4}, augment={"preset": "none"}, head_dropout=0.0,
                     epochs=2)
    on = train(lfw_data, spec, device="cpu", num_threads=1)
    off = train(lfw_data, spec.model_copy(update={"cache": spec.cache.model_copy(update={"mode": "off"})}),
                device="cpu", num_threads=1)
    assert on.applied["members"][0]["cache"]["path"] == "memory"
    assert off.applied["members"][0]["cache"]["path"] == "off"
    for a, b in zip(on.history, off.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4)
    for k, v in on.members[0].state_dict.items():
        torch.testing.assert_close(v, off.members[0].state_dict[k], rtol=1e-4, atol=1e-5)


def test_augmented_views_are_cached_and_cycled(lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec]) -> None:
    spec = tiny_spec(freeze={"mode": "first_n", "stages": 4}, cache={"views": 2}, epochs=3)
    result = train(lfw_data, spec, device="cpu", num_threads=1)
    plan = result.applied["members"][0]["cache"]
    assert plan["path"] == "memory" and plan["views"] == 2 and "augmented views" in plan["reason"]
    # mixup mixes images before the backbone: the cache must step aside and say why.
    mixed = train(lfw_data, spec.model_copy(update={"augment": spec.augment.model_copy(update={"mixup_alpha": 0.2}),
                                                    "epochs": 1}), device="cpu", num_threads=1)
    assert mixed.applied["members"][0]["cache"]["path"] == "off"
    assert "mixup" in mixed.applied["members"][0]["cache"]["reason"]


def test_ensemble_runs_a_shared_frozen_prefix_once() -> None:
    torch.manual_seed(0)
    base = timm.create_model("test_efficientnet", num_classes=3)
    members = []
    for seed in range(3):
        m = timm.create_model("test_efficientnet", num_classes=3)
        m.load_state_dict(base.state_dict())
        torch.manual_seed(seed)
        with torch.no_grad():  # each member fine-tuned its top: blocks.3 onwards and the head differ
            for name, p in m.named_parameters():
                if not name.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2")):
                    p.add_(torch.randn_like(p) * 0.05)
        members.append(m.eval())
    shared = Ensemble(members).eval()
    plain = Ensemble(members, share_prefix=False).eval()
    assert shared.shared_groups() == [(4, [0, 1, 2])]
    calls = []
    hook = members[0].blocks[0].register_forward_hook(lambda *_: calls.append(1))
    for other in members[1:]:
        other.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        got = shared(x)
        assert len(calls) == 1
        want = plain(x)
    assert len(calls) == 4
    hook.remove()
    torch.testing.assert_close(got, want)


def test_a_saved_ensemble_shares_its_frozen_prefix_at_prediction(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec], tmp_path: Path
) -> None:
    # Random init differs per member seed: nothing to share.
    spec = tiny_spec(epochs=1, freeze={"mode": "first_n", "stages": 3}, ensemble={"members": 2})
    result = train(lfw_data, spec, device="cpu", num_threads=1)
    predictor = load_predictor(save_artifact(result, spec, tmp_path / "random"), device="cpu")
    assert predictor.model.shared_groups() == [(0, [0]), (0, [1])]
    # The same pretrained weights, frozen: the members share stem, blocks.0 and blocks.1.
    spec = spec.model_copy(update={"backbone": "tf_efficientnet_lite0", "weights": "bundled"})
    result = train(lfw_data, spec, device="cpu", num_threads=1)
    predictor = load_predictor(save_artifact(result, spec, tmp_path / "m"), device="cpu")
    assert predictor.model.shared_groups() == [(3, [0, 1])]
    x = torch.from_numpy(lfw_data.images[:8])
    plain = Ensemble(list(predictor.model.members), share_prefix=False).eval()
    with torch.inference_mode():
        xn = normalize_batch(x, predictor.preprocess)
        torch.testing.assert_close(predictor.model(xn), plain(xn))


def _builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import models.training

    built: list[int] = []
    real = models.training.build_cache

    def counting(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        built.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(models.training, "build_cache", counting)
    return built


def test_members_with_the_same_pretrained_prefix_share_one_cache_and_train_the_same(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.training

    spec = tiny_spec(backbone="tf_efficientnet_lite0", weights="bundled", freeze={"mode": "first_n", "stages": 4},
                     augment={"preset": "none"}, head_dropout=0.0, epochs=1, ensemble={"members": 3})
    built = _builds(monkeypatch)
    shared = train(lfw_data, spec, device="cpu", num_threads=1)
    assert len(built) == 1  # three members, one cache
    assert [m["cache"]["path"] for m in shared.applied["members"]] == ["memory"] * 3

    real = models.training._Run.cache_for
    monkeypatch.setattr(models.training._Run, "cache_for",
                        lambda self, *a, share=None: real(self, *a[:6], None))  # each member its own
    built.clear()
    own = train(lfw_data, spec, device="cpu", num_threads=1)
    assert len(built) == 3
    for a, b in zip(shared.members, own.members, strict=True):
        for k, v in a.state_dict.items():
            torch.testing.assert_close(v, b.state_dict[k], rtol=1e-4, atol=1e-5)


def test_members_whose_prefix_features_differ_build_their_own_cache(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    # random init: each member's seed gives another prefix
    spec = tiny_spec(freeze={"mode": "first_n", "stages": 4}, head_dropout=0.0, epochs=1,
                     ensemble={"members": 2}, weights="none", augment={"preset": "none"})
    built = _builds(monkeypatch)
    train(lfw_data, spec, device="cpu", num_threads=1)
    assert len(built) == 2


def test_augmented_members_share_one_set_of_views_each_from_its_own_offset(
    lfw_data: ImageArray, tiny_spec: Callable[..., TrainSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The views are drawn once, under the job's seed; member i trains epoch e on view (e + i) % views."""
    from collections import Counter

    from models.prefix import FeatureCache

    spec = tiny_spec(backbone="tf_efficientnet_lite0", weights="bundled", freeze={"mode": "first_n", "stages": 4},
                     augment={"preset": "light"}, cache={"views": 4}, head_dropout=0.0, epochs=2,
                     ensemble={"members": 3})
    built = _builds(monkeypatch)
    views: Counter[int] = Counter()
    seen: list[FeatureCache] = []
    real = FeatureCache.train_batch

    def counting(self: FeatureCache, view: int, rows: np.ndarray) -> torch.Tensor:
        views[view % len(self.train)] += 1
        if not seen or seen[-1] is not self:
            seen.append(self)
        return real(self, view, rows)

    monkeypatch.setattr(FeatureCache, "train_batch", counting)
    result = train(lfw_data, spec, device="cpu", num_threads=1)
    assert len(built) == 1 and len(seen) == 1  # three members, one cache of augmented views
    assert [m["cache"]["path"] for m in result.applied["members"]] == ["memory"] * 3
    batches = views[0]  # member 1 epoch 1 (view 0); view 3 is member 3's epoch 2
    assert batches > 0 and views == {0: batches, 1: 2 * batches, 2: 2 * batches, 3: batches}
