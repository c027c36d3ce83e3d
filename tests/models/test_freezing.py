"""Freeze policies: trainable counts and BatchNorm statistics in the frozen part."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.freezing import apply_freeze, group_labels, parameter_groups, set_train_mode
from models.spec import BACKBONES, UnknownNameError
from models.zoo import count_parameters, create_backbone


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return create_backbone("tf_efficientnet_lite0", weights="none", num_classes=10)


def _numel(model: nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def test_lite0_groups_are_timm_stages(lite0: nn.Module) -> None:
    assert group_labels(lite0) == [
        "conv_stem+bn1",
        *(f"blocks.{i}" for i in range(6)),
        "blocks.6+conv_head+bn2",
        "classifier",
    ]


def test_linear_probe_trains_only_the_classifier(lite0: nn.Module) -> None:
    report = apply_freeze(lite0, mode="linear_probe", stages=0, train_bn=False)
    assert report.trainable_params == 1280 * 10 + 10
    assert {n for n, p in lite0.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert report.total_params == count_parameters(lite0)[1]
    assert len(report.frozen_groups) == 8
    assert len(report.frozen_bn) == sum(isinstance(m, nn.BatchNorm2d) for m in lite0.modules())


@pytest.mark.parametrize("stages", [0, 1, 3, 7, 8, 50])
def test_first_n_freezes_the_first_groups(lite0: nn.Module, stages: int) -> None:
    groups = parameter_groups(lite0)
    report = apply_freeze(lite0, mode="first_n", stages=stages, train_bn=False)
    n = min(stages, len(groups) - 1)  # the classifier group always trains
    frozen = _numel(lite0, [name for g in groups[:n] for name in g])
    assert report.trainable_params == report.total_params - frozen
    assert report.frozen_groups == group_labels(lite0)[:n]
    for gid, names in enumerate(groups):
        for name in names:
            assert dict(lite0.named_parameters())[name].requires_grad == (gid >= n), name


def test_none_trains_everything_and_undoes_a_previous_freeze(lite0: nn.Module) -> None:
    apply_freeze(lite0, mode="linear_probe", stages=0, train_bn=False)
    report = apply_freeze(lite0, mode="none", stages=5, train_bn=False)
    assert report.trainable_params == report.total_params
    assert report.frozen_groups == [] and report.frozen_bn == []


def test_unknown_mode() -> None:
    with pytest.raises(UnknownNameError):
        apply_freeze(nn.Linear(1, 1), mode="thaw", stages=0, train_bn=False)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_linear_probe_leaves_exactly_the_classifier_for_every_backbone(name: str) -> None:
    with torch.device("meta"):
        model = create_backbone(name, weights="none", num_classes=4)
    report = apply_freeze(model, mode="linear_probe", stages=0, train_bn=False)
    assert report.trainable_params == sum(p.numel() for p in model.get_classifier().parameters())
    first = apply_freeze(model, mode="first_n", stages=2, train_bn=False)
    assert 0 < first.trainable_params < first.total_params


def _steps(model: nn.Module, report, n: int = 3) -> None:
    torch.manual_seed(0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(n):
        set_train_mode(model, report)
        x = torch.randn(8, 3, 64, 64)
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _bn_stats(model: nn.Module, name: str) -> torch.Tensor:
    bn = model.get_submodule(name)
    return torch.cat([bn.running_mean, bn.running_var]).clone()


def test_frozen_batchnorm_statistics_do_not_move() -> None:
    model = create_backbone("tf_efficientnet_lite0", weights="bundled", num_classes=10)
    report = apply_freeze(model, mode="first_n", stages=3, train_bn=False)
    frozen, trained = ["bn1", "blocks.1.0.bn1"], ["blocks.5.0.bn1", "bn2"]
    assert set(frozen) <= set(report.frozen_bn) and not set(trained) & set(report.frozen_bn)
    before = {n: _bn_stats(model, n) for n in frozen + trained}
    stem = model.conv_stem.weight.clone()
    _steps(model, report)
    for n in frozen:
        assert not model.get_submodule(n).training
        assert torch.equal(_bn_stats(model, n), before[n]), f"{n} statistics moved"
    for n in trained:
        assert model.get_submodule(n).training
        assert not torch.equal(_bn_stats(model, n), before[n]), f"{n} statistics did not update"
    assert torch.equal(model.conv_stem.weight, stem)


def test_train_bn_lets_frozen_statistics_update() -> None:
    model = create_backbone("tf_efficientnet_lite0", weights="bundled", num_classes=10)
    report = apply_freeze(model, mode="first_n", stages=3, train_bn=True)
    assert report.frozen_bn == []
    before = _bn_stats(model, "bn1")
    stem = model.conv_stem.weight.clone()
    _steps(model, report, n=1)
    assert not torch.equal(_bn_stats(model, "bn1"), before)
    assert torch.equal(model.conv_stem.weight, stem)  # parameters still frozen
