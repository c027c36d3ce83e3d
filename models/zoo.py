"""The backbone zoo: timm models with bundled, hub or random weights.

Every name must be in ``models.spec.BACKBONES``. Weight sources:

* ``bundled``: ImageNet weights shipped inside an installed package (offline, see ``models.weights``);
* ``hub``: timm's normal pretrained download (needs a network; offline it fails with
  ``WeightsUnavailableError``);
* ``none``: random initialisation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from .errors import WeightsUnavailableError
from .spec import BACKBONES, WEIGHT_SOURCES, BackboneInfo, check_name
from .weights import bundled_available, load_bundled

# Exceptions from these libraries (anywhere in the cause chain) mean "the download failed".
_NETWORK_MODULES = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "urllib", "socket", "ssl")


@dataclass(frozen=True)
class Preprocess:
    """How images are turned into model input (shared by training, evaluation and prediction).

    Attributes:
        mean: per-channel mean of the normalisation (RGB, on the 0..1 scale).
        std: per-channel standard deviation of the normalisation.
        interpolation: resize filter name (``bicubic``, ``bilinear``, ...).
        image_size: side of the square model input in pixels.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists instead of tuples)."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of ``to_dict``."""
        mean = tuple(float(x) for x in d["mean"])
        std = tuple(float(x) for x in d["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"preprocess mean/std need 3 channels, got {mean} / {std}")
        return cls(
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            interpolation=str(d["interpolation"]),
            image_size=int(d["image_size"]),
        )


def backbone_info(name: str) -> BackboneInfo:
    """Registry entry of ``name``.

    Raises:
        UnknownNameError: ``name`` is not in ``BACKBONES``.
    """
    return BACKBONES[check_name("backbone", name, list(BACKBONES))]


def _pretrained_cfg(name: str) -> Any:
    backbone_info(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None:  # every BACKBONES entry has one; guard against a timm upgrade dropping it
        raise RuntimeError(f"timm has no pretrained config for {name!r}")
    return cfg


def preprocess_for(name: str, image_size: int | None = None) -> Preprocess:
    """Preprocessing of backbone ``name`` from timm's pretrained config.

    Args:
        name: backbone name (a key of ``BACKBONES``).
        image_size: overrides the backbone's native input size.

    Returns:
        The backbone's mean, std and interpolation, at ``image_size`` or its native size.

    Raises:
        UnknownNameError: ``name`` is not in ``BACKBONES``.
    """
    cfg = _pretrained_cfg(name)
    mean, std = tuple(float(x) for x in cfg.mean), tuple(float(x) for x in cfg.std)
    return Preprocess(
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        interpolation=str(cfg.interpolation or "bilinear"),
        image_size=int(image_size) if image_size else int(cfg.input_size[-1]),
    )


def bundled_alternatives() -> list[str]:
    """Backbones whose bundled (offline) weights are installed here."""
    return [n for n, info in BACKBONES.items() if info.bundled and bundled_available(n)]


def _alternatives_text() -> str:
    names = bundled_alternatives()
    if not names:
        return "no bundled offline weights are installed"
    return f"bundled offline weights exist for {', '.join(names)} (weights='bundled')"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _is_download_failure(exc: BaseException) -> bool:
    for e in _causes(exc):
        if isinstance(e, OSError | TimeoutError):  # ConnectionError, URLError, FileNotFoundError...
            return True
        if type(e).__module__.split(".")[0] in _NETWORK_MODULES:
            return True
    return False


def _size_kwargs(name: str, image_size: int | None) -> dict[str, Any]:
    # Models with a fixed input (ViT: position embeddings) are built for the requested size;
    # timm resamples pretrained position embeddings when loading. Convnets take any size.
    cfg = _pretrained_cfg(name)
    if image_size and cfg.fixed_input_size and image_size != cfg.input_size[-1]:
        return {"img_size": int(image_size)}
    return {}


def create_backbone(
    name: str,
    *,
    weights: str,
    num_classes: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    image_size: int | None = None,
) -> nn.Module:
    """Build a zoo backbone with a fresh ``num_classes`` classifier.

    The head applies dropout (``drop_rate``) to the pooled features before the classifier,
    in training mode only (timm's ``drop_rate``); ``drop_path_rate`` turns on stochastic depth
    (timm's ``DropPath`` in the residual blocks, the rate growing linearly to ``drop_path_rate``
    at the deepest block, also in training mode only). As with timm's ``pretrained=True``, a
    ``num_classes`` equal to the checkpoint's (1000) keeps the pretrained ImageNet classifier.

    Args:
        name: backbone name (a key of ``BACKBONES``).
        weights: ``bundled`` (offline package weights), ``hub`` (timm download) or ``none`` (random).
        num_classes: outputs of the new classifier.
        drop_rate: dropout probability before the classifier.
        drop_path_rate: stochastic depth rate of the deepest block; 0 disables.
        image_size: input size; only matters for fixed-input models (ViT), which are built for it.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        UnknownNameError: unknown backbone or weight source.
        WeightsUnavailableError: the weights cannot be obtained here (missing package, no network).
    """
    info = backbone_info(name)
    check_name("weight source", weights, WEIGHT_SOURCES)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kwargs: dict[str, Any] = {"drop_rate": float(drop_rate), **_size_kwargs(name, image_size)}
    if drop_path_rate:  # only when asked: timm models without stochastic depth do not take the argument
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        kwargs["drop_path_rate"] = float(drop_path_rate)

    if weights == "bundled":
        if not info.bundled:
            raise WeightsUnavailableError(f"backbone {name!r} has no bundled weights; {_alternatives_text()}")
        # Load the full 1000-class checkpoint first so every shape is checked, then swap the head.
        imagenet_classes = int(_pretrained_cfg(name).num_classes or 1000)
        model: Any = timm.create_model(name, pretrained=False, num_classes=imagenet_classes, **kwargs)
        load_bundled(model, name)
        if num_classes != imagenet_classes:
            model.reset_classifier(num_classes)
        return model

    if weights == "hub":
        if not info.hub:
            raise WeightsUnavailableError(f"backbone {name!r} has no hub weights; {_alternatives_text()}")
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:
            if _is_download_failure(e):
                raise WeightsUnavailableError(
                    f"hub weights for {name!r} could not be downloaded (offline?): {e}; {_alternatives_text()}"
                ) from e
            raise

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Number of ``(trainable, total)`` parameters of ``model``."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@functools.cache
def _shape_facts(name: str) -> tuple[int, int]:
    # Built on the meta device: no memory, no initialisation, a few hundred ms at most.
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return count_parameters(model)[1], int(getattr(model, "num_features", 0))


def backbone_card(name: str) -> dict[str, Any]:
    """What the zoo knows about one backbone, JSON-safe.

    Args:
        name: backbone name (a key of ``BACKBONES``).

    Returns:
        ``name``, ``description``, ``parameters`` (with its ImageNet head), ``feature_dim``,
        ``input_size`` (native side in pixels), ``fixed_input_size``, ``mean``, ``std``,
        ``interpolation`` and ``weight_sources``: ``bundled`` when its package is installed,
        ``hub`` when timm knows a download (availability needs a network, so not checked), ``none``.

    Raises:
        UnknownNameError: ``name`` is not in ``BACKBONES``.
    """
    info = backbone_info(name)
    cfg = _pretrained_cfg(name)
    pre = preprocess_for(name)
    parameters, feature_dim = _shape_facts(name)
    sources = []
    if info.bundled and bundled_available(name):
        sources.append("bundled")
    if info.hub:
        sources.append("hub")
    sources.append("none")
    return {
        "name": name,
        "description": info.description,
        "parameters": parameters,
        "feature_dim": feature_dim,
        "input_size": pre.image_size,
        "fixed_input_size": bool(cfg.fixed_input_size),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "weight_sources": sources,
    }


def list_backbones() -> list[dict[str, Any]]:
    """``backbone_card`` of every ``BACKBONES`` entry, in registry order."""
    return [backbone_card(name) for name in BACKBONES]
