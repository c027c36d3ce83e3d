"""Head regularisers (DropConnect, stochastic depth, fractional max pooling), loss and mixup."""

from __future__ import annotations

import json
import logging
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.freezing import apply_freeze, group_labels
from models.heads import (
    HEAD_POOLS,
    DropConnectLinear,
    FractionalMaxAvgPool2d,
    HeadConfig,
    batch_mixer,
    create_classifier,
    train_criterion,
)
from models.spec import BACKBONES, AugmentSpec, TrainSpec, UnknownNameError
from models.weights import bundled_weights_path
from models.zoo import create_backbone

TINY = "test_efficientnet"
# ViT pools tokens, not a feature map: no fractional max pooling (see test_unsupported_option_names_it).
SPATIAL = [name for name in BACKBONES if not name.startswith("vit_")]


def _train_but_bn(model: nn.Module) -> nn.Module:
    """Training mode with BatchNorm frozen, so only the regulariser under test is random."""
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    return model


def _two(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(x), model(x)


# --------------------------------------------------------------------------- HeadConfig


def test_head_config_from_spec_and_json_round_trip() -> None:
    spec = TrainSpec(
        backbone=TINY, weights="none", head_dropout=0.1, drop_connect=0.2, drop_path=0.3, head_pool="fractional_max"
    )
    head = HeadConfig.from_spec(spec)
    assert head == HeadConfig(drop_rate=0.1, drop_connect=0.2, drop_path=0.3, pool="fractional_max")
    assert HeadConfig.from_dict(json.loads(json.dumps(head.to_dict()))) == head


def test_head_config_reads_old_manifests() -> None:
    # Manifests written before these options only had drop_rate (and other member keys).
    old = {"backbone": TINY, "num_classes": 3, "drop_rate": 0.25}
    assert HeadConfig.from_dict(old) == HeadConfig(drop_rate=0.25, drop_connect=0.0, drop_path=0.0, pool="avg")


def test_head_config_validates() -> None:
    with pytest.raises(UnknownNameError, match="valid: avg, fractional_max"):
        HeadConfig(pool="max")
    with pytest.raises(ValueError, match="drop_connect"):
        HeadConfig.from_dict({"drop_connect": 1.0})


def test_head_pools_match_the_spec() -> None:
    assert set(HEAD_POOLS) == set(typing.get_args(TrainSpec.model_fields["head_pool"].annotation))


# --------------------------------------------------------------------------- DropConnect


def _effective_weight(layer: DropConnectLinear) -> torch.Tensor:
    # With an identity batch and no bias the outputs are the rows of W_eff^T: one forward, one mask.
    with torch.no_grad():
        return layer(torch.eye(layer.in_features)).T


def test_drop_connect_masks_weights_not_activations() -> None:
    torch.manual_seed(0)
    layer = DropConnectLinear(16, 12, bias=False, p=0.5)
    w = layer.weight.detach()
    eff = _effective_weight(layer.train())
    kept = eff != 0
    # Every weight is either dropped or kept and scaled by 1 / (1 - p).
    assert torch.allclose(eff[kept], 2 * w[kept])
    assert 0.3 < (~kept).float().mean() < 0.7
    # Dropout on an input would zero a whole column, on an output a whole row: here single weights go.
    mixed_columns = (kept.any(0) & (~kept).any(0)).sum()
    mixed_rows = (kept.any(1) & (~kept).any(1)).sum()
    assert mixed_columns >= 12 and mixed_rows >= 8
    # The same input column contributes to some outputs and not to others, in the same forward.
    with torch.no_grad():
        x = torch.zeros(1, 16)
        x[0, 0] = 1.0
        out = layer(x)[0]
    assert (out == 0).any() and (out != 0).any()


def test_drop_connect_is_fresh_per_forward_and_unbiased() -> None:
    torch.manual_seed(0)
    layer = DropConnectLinear(6, 5, bias=False, p=0.3).train()
    first, second = _effective_weight(layer), _effective_weight(layer)
    assert not torch.equal(first != 0, second != 0), "the mask must be drawn afresh every forward"
    mean = torch.stack([_effective_weight(layer) for _ in range(3000)]).mean(0)
    w = layer.weight.detach()
    # Each entry's sample mean has a standard deviation of |w| * sqrt(p / (1 - p) / 3000) ~ 0.012 |w|.
    assert torch.allclose(mean, w, atol=0.06 * float(w.abs().max()))


def test_drop_connect_leaves_the_bias_alone() -> None:
    layer = DropConnectLinear(4, 3, p=0.9).train()
    with torch.no_grad():
        for _ in range(5):
            assert torch.equal(layer(torch.zeros(2, 4)), layer.bias.expand(2, 3))


def test_drop_connect_eval_is_plain_linear_with_the_same_state_dict() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    layer = DropConnectLinear.from_linear(linear, 0.5)
    assert layer.state_dict().keys() == linear.state_dict().keys() == {"weight", "bias"}
    x = torch.randn(3, 8)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x)) and torch.equal(layer(x), layer(x))
    plain = nn.Linear(8, 4)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), layer(x))
    with torch.no_grad():
        a, b = _two(layer.train(), x)
    assert not torch.equal(a, b)
    assert "p=0.5" in repr(layer)


def test_drop_connect_gradient_reaches_kept_weights_only() -> None:
    torch.manual_seed(0)
    layer = DropConnectLinear(10, 1, bias=False, p=0.5).train()
    layer(torch.ones(1, 10)).sum().backward()
    assert layer.weight.grad is not None
    grad = layer.weight.grad[0]
    assert set(grad.unique().tolist()) == {0.0, 2.0}  # dropped: 0; kept: 1 / (1 - p)


# --------------------------------------------------------------------------- fractional max pooling


def test_fractional_max_pool_random_in_training_fixed_in_eval() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    pool = FractionalMaxAvgPool2d()
    a, b = _two(pool.train(), x)
    assert a.shape == (2, 4) and not torch.equal(a, b)
    c, d = _two(pool.eval(), x)
    assert torch.equal(c, d)
    expected = F.fractional_max_pool2d(x, 2, output_size=(6, 6), _random_samples=torch.full((2, 4, 2), 0.5))
    assert torch.equal(c, expected.mean(dim=(2, 3)))
    assert not torch.allclose(c, x.mean(dim=(2, 3))), "must differ from average pooling"
    assert pool.eval()(x.clone()).data_ptr() != x.data_ptr()
    assert FractionalMaxAvgPool2d(flatten=False).eval()(x).shape == (2, 4, 1, 1)


def test_fractional_max_pool_small_maps(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(3, 5, 2, 2)
    pool = FractionalMaxAvgPool2d().train()
    # A 2x2 map leaves a single 2x2 region: global max pooling.
    assert torch.equal(pool(x), x.amax(dim=(2, 3)))
    one = torch.randn(3, 5, 1, 1)
    with caplog.at_level(logging.WARNING, logger="models.heads"):
        assert torch.equal(pool(one), one.flatten(1))
        pool(one)
    assert sum("average pooling" in r.message for r in caplog.records) == 1


# --------------------------------------------------------------------------- create_classifier


def test_drop_connect_classifier_keeps_init_and_freezing() -> None:
    torch.manual_seed(0)
    plain = create_backbone(TINY, weights="none", num_classes=3)
    torch.manual_seed(0)
    model = create_classifier(TINY, weights="none", num_classes=3, head=HeadConfig(drop_connect=0.4))
    classifier = model.get_classifier()
    assert isinstance(classifier, DropConnectLinear) and classifier.p == 0.4
    assert model.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert group_labels(model) == group_labels(plain)
    report = apply_freeze(model, mode="linear_probe", stages=0, train_bn=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert report.trainable_params == 3 * classifier.in_features + 3
    first_n = apply_freeze(model, mode="first_n", stages=99, train_bn=False)
    assert all(p.requires_grad for p in classifier.parameters()) and "classifier" not in first_n.frozen_groups
    model.reset_classifier(5)  # timm's reset still works: a plain new head
    assert type(model.get_classifier()) is nn.Linear and model.get_classifier().out_features == 5


def test_bundled_imagenet_classifier_is_copied_into_drop_connect() -> None:
    head = HeadConfig(drop_connect=0.2, pool="fractional_max")
    model = create_classifier("tf_efficientnet_lite0", weights="bundled", num_classes=1000, head=head, image_size=64)
    source = torch.load(bundled_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    imagenet_weight, imagenet_bias = list(source.values())[-2:]
    classifier = model.get_classifier()
    assert isinstance(classifier, DropConnectLinear)
    assert torch.equal(classifier.weight, imagenet_weight) and torch.equal(classifier.bias, imagenet_bias)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = _two(model.eval(), x)
    assert torch.equal(a, b)


def test_drop_connect_alone_makes_training_random() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = create_classifier(TINY, weights="none", num_classes=4, head=HeadConfig(drop_connect=0.5), image_size=32)
    a, b = _two(_train_but_bn(model), x)
    assert not torch.allclose(a, b)
    c, d = _two(model.eval(), x)
    assert torch.equal(c, d)
    plain = create_classifier(TINY, weights="none", num_classes=4, head=HeadConfig(), image_size=32)
    plain.load_state_dict(model.state_dict())
    a, b = _two(_train_but_bn(plain), x)
    assert torch.equal(a, b)
    assert torch.equal(plain.eval()(x), c)


def test_drop_path_only_in_training() -> None:
    # Real weights: timm zero-initialises the last BatchNorm of each residual branch, so with random
    # weights every branch is zero and dropping it changes nothing.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    head = HeadConfig(drop_path=0.5)
    model = create_classifier("tf_efficientnet_lite0", weights="bundled", num_classes=4, head=head, image_size=32)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and 0 < max(rates) <= 0.5
    a, b = _two(_train_but_bn(model), x)
    assert not torch.allclose(a, b), "stochastic depth is not applied in training"
    c, d = _two(model.eval(), x)
    assert torch.equal(c, d)


def test_fractional_max_model_differs_from_avg_and_is_fixed_in_eval() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 160, 160)  # 5x5 feature map at stride 32: the smallest where regions vary
    head = HeadConfig(pool="fractional_max")
    model = create_classifier(TINY, weights="none", num_classes=4, head=head, image_size=160)
    assert isinstance(model.global_pool, FractionalMaxAvgPool2d)
    a, b = _two(_train_but_bn(model), x)
    assert not torch.allclose(a, b)
    c, d = _two(model.eval(), x)
    assert torch.equal(c, d)
    avg = create_classifier(TINY, weights="none", num_classes=4, head=HeadConfig(), image_size=160)
    avg.load_state_dict(model.state_dict())  # pooling has no parameters: same keys
    assert not torch.allclose(avg.eval()(x), c)


def test_rebuild_from_manifest_dict_round_trips_outputs() -> None:
    head = HeadConfig(drop_rate=0.3, drop_connect=0.3, drop_path=0.2, pool="fractional_max")
    torch.manual_seed(0)
    model = create_classifier(TINY, weights="none", num_classes=3, head=head, image_size=96)
    _train_but_bn(model)
    model.train()  # one step so BN statistics and weights are not the init
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(torch.randn(4, 3, 96, 96)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    manifest = json.loads(json.dumps({"head": head.to_dict()}))
    torch.manual_seed(1)
    rebuilt = create_classifier(TINY, weights="none", num_classes=3, head=HeadConfig.from_dict(manifest["head"]))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.parametrize("name", SPATIAL)
def test_every_convnet_takes_every_head_option(name: str) -> None:
    head = HeadConfig(drop_rate=0.1, drop_connect=0.2, drop_path=0.1, pool="fractional_max")
    with torch.device("meta"):  # structure only: no memory, no init
        model = create_classifier(name, weights="none", num_classes=3, head=head)
    assert isinstance(model.get_classifier(), DropConnectLinear)
    assert sum(isinstance(m, FractionalMaxAvgPool2d) for m in model.modules()) == 1
    assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules())
    assert group_labels(model)[-1].split("+")[-1] in ("classifier", "fc", "head"), group_labels(model)


def test_unsupported_option_names_it() -> None:
    head = HeadConfig(pool="fractional_max")
    with torch.device("meta"), pytest.raises(ValueError, match=r"'vit_small_patch16_224'.*head_pool='fractional_max'"):
        create_classifier("vit_small_patch16_224", weights="none", num_classes=3, head=head)


# --------------------------------------------------------------------------- loss and mixing


def test_label_smoothing_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 1])
    logp = logits.log_softmax(dim=1)
    eps, k = 0.3, 3
    by_hand = -((1 - eps) * logp[[0, 1], y] + eps / k * logp.sum(dim=1)).mean()
    smoothed = train_criterion(TrainSpec(backbone=TINY, weights="none", label_smoothing=eps))
    plain = train_criterion(TrainSpec(backbone=TINY, weights="none"))
    assert torch.allclose(smoothed(logits, y), by_hand)
    assert torch.allclose(plain(logits, y), F.cross_entropy(logits, y))
    assert not torch.allclose(smoothed(logits, y), plain(logits, y))
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.1, 0.8]])
    assert torch.allclose(smoothed(logits, soft), -(soft * logp).sum(dim=1).mean())


def test_no_mixer_without_mixup_or_cutmix() -> None:
    assert batch_mixer(AugmentSpec(preset="none"), 3) is None
    assert batch_mixer(AugmentSpec(preset="standard"), 3) is None
    assert batch_mixer(AugmentSpec(preset="strong"), 3) is not None


@pytest.mark.parametrize("n", [4, 5, 1])
def test_mixup_mixes_images_and_targets_alike(n: int) -> None:
    np.random.seed(0)
    mix = batch_mixer(AugmentSpec(preset="none", mixup_alpha=1.0), num_classes=n + 2)
    assert mix is not None
    x = torch.randn(n, 3, 8, 8)
    y = torch.arange(n)
    original = x.clone()
    xm, ym = mix(x, y)
    assert torch.equal(x, original), "the input batch must not be modified"
    assert xm.shape == x.shape and ym.shape == (n, n + 2)
    assert torch.allclose(ym.sum(dim=1), torch.ones(n))
    # Image i is mixed with image n-1-i; an odd batch pads with a copy of the last image,
    # which becomes image 0's partner. Each target must describe its own image.
    partner = [n - 1 - i for i in range(n)] if n % 2 == 0 else [n - 1, *(n - i for i in range(1, n))]
    lam = float(ym[0, y[0]]) if partner[0] != 0 else 1.0
    for i, j in enumerate(partner):
        assert torch.allclose(xm[i], lam * original[i] + (1 - lam) * original[j], atol=1e-6)
        expected = torch.zeros(n + 2)
        expected[y[i]] += lam
        expected[y[j]] += 1 - lam
        assert torch.allclose(ym[i], expected, atol=1e-6)
    if n > 1:
        assert 0 < lam < 1 and not torch.equal(xm, original)


def test_cutmix_targets_follow_the_pasted_area() -> None:
    np.random.seed(0)
    mix = batch_mixer(AugmentSpec(preset="none", cutmix_alpha=1.0), num_classes=5, label_smoothing=0.1)
    assert mix is not None
    x = torch.rand(5, 3, 16, 16) + torch.arange(5.0)[:, None, None, None] * 10  # images tell apart
    y = torch.tensor([0, 1, 2, 3, 4])
    xm, ym = mix(x, y)
    assert torch.allclose(ym.sum(dim=1), torch.ones(5))
    assert float(ym.min()) == pytest.approx(0.1 / 5)  # smoothing folded into the soft targets
    own = (xm == x).all(dim=1).float().mean(dim=(1, 2))  # share of pixels still from the image itself
    smooth_on = 1 - 0.1 + 0.1 / 5
    lam = (ym[torch.arange(5), y] - 0.1 / 5) / (smooth_on - 0.1 / 5)
    assert torch.allclose(own, lam, atol=1e-6)
    assert (own < 1).all()


def test_mixer_refuses_uint8_and_pairs_with_the_criterion() -> None:
    np.random.seed(0)
    spec = TrainSpec(backbone=TINY, weights="none", label_smoothing=0.1, augment={"preset": "strong"})
    mix = batch_mixer(spec.augment, 3, spec.label_smoothing)
    assert mix is not None
    with pytest.raises(ValueError, match="float"):
        mix(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    xm, ym = mix(torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2]))
    loss = train_criterion(spec)(torch.randn(3, 3, requires_grad=True), ym)
    assert loss.ndim == 0 and torch.isfinite(loss)
