"""The backbone zoo: names, preprocessing, bundled/hub/random weights, cards, head dropout."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
from timm.layers import DropPath
from torch.nn.modules.batchnorm import _BatchNorm

from models import weights as bundled
from models.data import open_image, to_array
from models.errors import WeightsUnavailableError
from models.spec import BACKBONES, UnknownNameError
from models.transforms import normalize_batch
from models.zoo import (
    Preprocess,
    backbone_card,
    count_parameters,
    create_backbone,
    list_backbones,
    preprocess_for,
)
from tests.utils.datasets import foolbox_imagenet

BUNDLED = [name for name, info in BACKBONES.items() if info.bundled]


def test_preprocess_from_timm_config() -> None:
    pre = preprocess_for("tf_efficientnet_lite0")
    assert pre == Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", image_size=224)
    assert preprocess_for("tf_efficientnet_lite2").image_size == 260
    assert preprocess_for("resnet18", 96).image_size == 96
    assert preprocess_for("resnet18").mean == pytest.approx((0.485, 0.456, 0.406))
    assert Preprocess.from_dict(pre.to_dict()) == pre


@pytest.mark.parametrize(
    "call",
    [
        lambda: create_backbone("resnet9000", weights="none", num_classes=2),
        lambda: preprocess_for("resnet9000"),
        lambda: backbone_card("resnet9000"),
        lambda: create_backbone("resnet18", weights="torrent", num_classes=2),
    ],
)
def test_unknown_names_list_valid_ones(call) -> None:
    with pytest.raises(UnknownNameError, match="valid: "):
        call()


def test_bundled_lite0_classifies_imagenet_photos() -> None:
    # The point of bundled weights: real ImageNet accuracy offline (20 labelled val photos).
    model = create_backbone("tf_efficientnet_lite0", weights="bundled", num_classes=1000).eval()
    pre = preprocess_for("tf_efficientnet_lite0", 224)
    files = foolbox_imagenet()
    assert len(files) == 20
    x = np.stack([to_array(open_image(p, p.name), pre.image_size, pre.interpolation) for p, _ in files])
    y = torch.tensor([c for _, c in files])
    with torch.inference_mode():
        probs = model(normalize_batch(x, pre)).softmax(dim=-1)
    top1 = (probs.argmax(dim=1) == y).float().mean().item()
    top5 = (probs.topk(5).indices == y[:, None]).any(dim=1).float().mean().item()
    assert top1 >= 0.85, top1
    assert top5 >= 0.95, top5


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_weights_map_onto_timm_keys(name: str) -> None:
    model = create_backbone(name, weights="bundled", num_classes=7, drop_rate=0.3)
    source = torch.load(bundled.bundled_weights_path(name), map_location="cpu", weights_only=True)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    # First tensor (stem conv) and the last feature tensor before the ImageNet head.
    assert torch.equal(model.conv_stem.weight, src[0])
    assert torch.equal(model.bn2.running_var, src[-3])
    assert model.get_classifier().out_features == 7
    assert model.drop_rate == 0.3


def test_bundled_shape_mismatch_is_refused() -> None:
    source = {k: v for k, v in timm.create_model("test_efficientnet").state_dict().items()}
    target = timm.create_model("tf_efficientnet_lite0")
    with pytest.raises(WeightsUnavailableError, match="tensors"):
        bundled.map_state_dict(source, target, name="tf_efficientnet_lite0")


def test_bundled_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        bundled.BUNDLED_PACKAGES, "tf_efficientnet_lite0", bundled.BundledPackage("no_such_pkg_xyz", "Nope")
    )
    with pytest.raises(WeightsUnavailableError, match="no_such_pkg_xyz"):
        create_backbone("tf_efficientnet_lite0", weights="bundled", num_classes=3)
    assert "bundled" not in backbone_card("tf_efficientnet_lite0")["weight_sources"]


def test_bundled_refused_for_backbone_without_package() -> None:
    with pytest.raises(WeightsUnavailableError, match="tf_efficientnet_lite0"):
        create_backbone("resnet18", weights="bundled", num_classes=3)


def _offline(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> list[str]:
    """Make every timm download raise ``exc``; returns the list of attempted downloads."""
    attempts: list[str] = []

    def fail(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:1]))
        raise exc

    import timm.models._builder as builder
    import timm.models._hub as hub

    monkeypatch.setattr(hub, "hf_hub_download", fail)
    monkeypatch.setattr(hub, "download_cached_file", fail)
    monkeypatch.setattr(builder, "load_state_dict_from_url", fail)
    monkeypatch.setattr(builder, "download_cached_file", fail)
    return attempts


def _hub_errors() -> list[Exception]:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return [
        ConnectionError("[Errno 101] Network is unreachable"),
        LocalEntryNotFoundError("cannot find the requested files in the local cache"),
    ]


@pytest.mark.parametrize("exc", _hub_errors(), ids=["connection", "hf-hub"])
def test_hub_offline_names_bundled_alternatives(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    attempts = _offline(monkeypatch, exc)
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("resnet18", weights="hub", num_classes=3)
    assert attempts, "the download path was not exercised"
    message = str(info.value)
    assert "'resnet18'" in message and "offline" in message
    assert "tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2" in message
    assert "weights='bundled'" in message


def test_hub_other_errors_are_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch, KeyError("corrupt checkpoint"))
    with pytest.raises(KeyError):
        create_backbone("resnet18", weights="hub", num_classes=3)


def test_hub_refused_without_hub_weights() -> None:
    with pytest.raises(WeightsUnavailableError, match="no hub weights"):
        create_backbone("test_efficientnet", weights="hub", num_classes=3)


def test_backbone_cards_are_cheap_and_complete() -> None:
    t0 = time.perf_counter()
    cards = list_backbones()
    assert time.perf_counter() - t0 < 30
    assert [c["name"] for c in cards] == list(BACKBONES)
    by_name = {c["name"]: c for c in cards}
    for name in BUNDLED:
        assert by_name[name]["weight_sources"] == ["bundled", "hub", "none"]
    assert by_name["resnet18"]["weight_sources"] == ["hub", "none"]
    assert by_name["test_efficientnet"]["weight_sources"] == ["none"]
    assert by_name["tf_efficientnet_lite1"]["input_size"] == 240
    # Built on the meta device but counted right: compare with a real ImageNet-head model.
    real = timm.create_model("test_efficientnet")
    assert by_name["test_efficientnet"]["parameters"] == count_parameters(real)[1]
    assert by_name["tf_efficientnet_lite0"]["parameters"] == 4_652_008


def test_count_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == (4 + 8 + 2, 12 + 4 + 8 + 2)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_head_dropout_active_in_training_only(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)

    def two_train_forwards(drop_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        model = create_backbone(name, weights="none", num_classes=5, drop_rate=drop_rate, image_size=64)
        model.train()
        for m in model.modules():  # only dropout may make two training forwards differ
            if isinstance(m, _BatchNorm):
                m.eval()
        with torch.no_grad():
            a, b = model(x), model(x)
            model.eval()
            c, d = model(x), model(x)
        assert torch.equal(c, d), "eval mode must be deterministic"
        return a, b

    a, b = two_train_forwards(0.5)
    assert not torch.allclose(a, b), f"{name}: head dropout is not applied in training"
    a, b = two_train_forwards(0.0)
    assert torch.allclose(a, b), f"{name}: something other than head dropout is random"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_drop_path_rate_reaches_every_backbone(name: str) -> None:
    with torch.device("meta"):  # structure only
        plain = create_backbone(name, weights="none", num_classes=3)
        model = create_backbone(name, weights="none", num_classes=3, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and 0 < max(rates) <= 0.2 + 1e-6, f"{name}: stochastic depth missing"
    assert not any(m.drop_prob > 0 for m in plain.modules() if isinstance(m, DropPath))


def test_drop_path_rate_is_checked() -> None:
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_backbone("test_efficientnet", weights="none", num_classes=3, drop_path_rate=1.0)
