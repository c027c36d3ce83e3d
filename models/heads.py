"""Classifier heads and the training objective: regularisers around the new classifier.

The job's head options (``TrainSpec.head_dropout``, ``drop_connect``, ``drop_path``,
``head_pool``) become a ``HeadConfig``, a small JSON-safe dataclass that the artifact
manifest stores so ``create_classifier`` rebuilds the very same architecture at load time:

* ``drop_rate``: dropout on the pooled features (timm's ``drop_rate``);
* ``drop_connect``: DropConnect on the classifier, ``DropConnectLinear`` (Wan et al., 2013);
* ``drop_path``: stochastic depth in the residual blocks (timm's ``drop_path_rate``);
* ``pool``: ``avg`` (timm's global average) or ``fractional_max``, ``FractionalMaxAvgPool2d``
  (Graham, 2014, then a global average).

Every option is only random in training mode; in eval mode the model is deterministic.
The loss (``train_criterion``) and mixup/cutmix (``batch_mixer``) wrap timm's
``SoftTargetCrossEntropy`` and ``Mixup``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.loss import SoftTargetCrossEntropy
from timm.models.efficientnet import EfficientNet
from torch import nn

from .errors import ZooError
from .spec import AugmentSpec, TrainSpec, check_name
from .zoo import create_backbone

logger = logging.getLogger(__name__)

HEAD_POOLS: tuple[str, ...] = ("avg", "fractional_max")
HEAD_FEATURES: tuple[str, ...] = ("last", "multi_stage")

# Graham's fractional max pooling: 2x2 regions, each side shrinks by sqrt(2).
FMP_KERNEL = 2
FMP_RATIO = 1 / math.sqrt(2)

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class UnsupportedHeadError(ZooError, ValueError):
    """A head option the chosen backbone cannot take (e.g. fractional max pooling on a ViT)."""

    def __init__(self, backbone: str, option: str, reason: str) -> None:
        self.backbone = backbone
        self.option = option
        super().__init__(f"backbone {backbone!r} does not support {option}: {reason}")


# --------------------------------------------------------------------------- the config


def _rate(name: str, value: object) -> float:
    rate = float(cast(Any, value))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return rate


@dataclass(frozen=True)
class HeadConfig:
    """The head of a classifier, as stored in the artifact manifest.

    Attributes:
        drop_rate: dropout probability on the pooled features.
        drop_connect: probability of dropping each classifier weight (0 keeps ``nn.Linear``).
        drop_path: stochastic depth rate of the deepest block (timm scales it down towards the stem).
        pool: global pooling before the classifier, one of ``HEAD_POOLS``.
        features: what the classifier reads, one of ``HEAD_FEATURES``: ``last`` (the last stage's
            pooled features) or ``multi_stage`` (``MultiStageEfficientNet``: several stages pooled, joined).
    """

    drop_rate: float = 0.0
    drop_connect: float = 0.0
    drop_path: float = 0.0
    pool: str = "avg"
    features: str = "last"

    def __post_init__(self) -> None:
        for name in ("drop_rate", "drop_connect", "drop_path"):
            object.__setattr__(self, name, _rate(name, getattr(self, name)))
        check_name("head pool", self.pool, HEAD_POOLS)
        check_name("head features", self.features, HEAD_FEATURES)

    @classmethod
    def from_spec(cls, spec: TrainSpec) -> HeadConfig:
        """The head a job asks for (``head_dropout``, ``drop_connect``, ``drop_path``, ``head_pool``)."""
        return cls(
            drop_rate=spec.head_dropout,
            drop_connect=spec.drop_connect,
            drop_path=spec.drop_path,
            pool=spec.head_pool,
            features=spec.head_features,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadConfig:
        """Inverse of ``to_dict``.

        Missing keys take their defaults, so a manifest written before these options existed
        (only ``drop_rate``) rebuilds the plain timm head; other keys are ignored, so a whole
        manifest member entry may be passed.

        Raises:
            ValueError: a rate outside ``[0, 1)``; ``UnknownNameError`` for an unknown pool.
        """
        known = {k: d[k] for k in ("drop_rate", "drop_connect", "drop_path", "pool", "features") if k in d}
        return cls(**known)


# --------------------------------------------------------------------------- layers


class DropConnectLinear(nn.Linear):
    """``nn.Linear`` whose weight matrix is randomly masked in training (DropConnect).

    Each training forward draws one fresh Bernoulli(1 - ``p``) mask over the weight matrix, shared
    by the whole batch, and scales the kept weights by 1 / (1 - ``p``) so the expected output equals
    the plain layer's; this is ``F.dropout`` applied to the weight instead of the activations. The
    bias is not masked (a dropped bias would shift a logit for every input alike). Eval mode is the
    plain linear layer. Parameters and ``state_dict`` keys are ``nn.Linear``'s (``weight``, ``bias``),
    so weights load interchangeably.

    Args:
        in_features: inputs.
        out_features: outputs.
        bias: whether the layer has a bias.
        p: probability of dropping each weight, in ``[0, 1)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: float = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.p = _rate("drop_connect", p)

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> DropConnectLinear:
        """A DropConnect copy of ``linear`` (same weights, device and dtype)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, p, w.device, w.dtype)
        layer.load_state_dict(linear.state_dict())
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.dropout(self.weight, self.p, training=True) if self.training and self.p > 0 else self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class FractionalMaxAvgPool2d(nn.Module):
    """Global pooling: fractional max pooling (Graham, 2014), then the average over what is left.

    Fractional max pooling shrinks each side by ``output_ratio`` with ``kernel_size`` regions
    placed pseudo-randomly; averaging its output gives one vector per image, like global average
    pooling but from local maxima. In training the regions are drawn afresh every forward (one draw
    per image and channel, as ``nn.FractionalMaxPool2d``); in eval mode they are fixed (torch's
    ``_random_samples`` at 0.5), so predictions are reproducible.

    Small feature maps: with 2x2 regions, sides of 2 to 4 leave only one way to place them, so the
    regions only vary from a 5x5 map up (160 px input at stride 32; 224 px gives 7x7), and a 2x2 map
    makes this a global max pooling. A side below ``kernel_size`` (a 1x1 map, e.g. a stride-32
    backbone at 32 px input) cannot be pooled: the layer then falls back to global average pooling
    (logged once per layer).

    Args:
        flatten: return ``[N, C]`` (True) or ``[N, C, 1, 1]`` (False), as the replaced pool did.
        kernel_size: side of the pooling regions.
        output_ratio: output side / input side of the fractional max pooling.
    """

    # timm's reset_classifier rebuilds the pool from this name, and SelectAdaptivePool2d knows no
    # fractional pooling: a reset gives the plain average pool back (see apply_head).
    pool_type = "avg"
    # Random in training without any parameter: the frozen-prefix cache must never cache it.
    random_in_training = True

    def __init__(self, flatten: bool = True, kernel_size: int = FMP_KERNEL, output_ratio: float = FMP_RATIO) -> None:
        super().__init__()
        self.flatten = flatten
        self.kernel_size = kernel_size
        self.output_ratio = output_ratio
        self._warned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if min(h, w) >= self.kernel_size:
            samples = None if self.training else x.new_full((n, c, 2), 0.5)
            # The last region must still fit: output + kernel - 1 <= input.
            size = tuple(max(1, min(int(side * self.output_ratio), side - self.kernel_size + 1)) for side in (h, w))
            x = F.fractional_max_pool2d(x, self.kernel_size, output_size=size, _random_samples=samples)
        elif not self._warned:
            self._warned = True
            logger.warning(
                "fractional max pooling needs a feature map of at least %dx%d, got %dx%d (input too small "
                "for the backbone's stride): using global average pooling",
                self.kernel_size,
                self.kernel_size,
                h,
                w,
            )
        x = x.mean(dim=(2, 3), keepdim=not self.flatten)
        return x

    # The two methods timm calls on a SelectAdaptivePool2d.
    def is_identity(self) -> bool:
        return False

    def feat_mult(self) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, output_ratio={self.output_ratio:.4f}, flatten={self.flatten}"


class MultiStageEfficientNet(EfficientNet):
    """An EfficientNet whose classifier reads features pooled from several stages, joined.

    ImageNet's last-stage features are the most ImageNet-specific; for little data from another
    domain (grayscale, sketches, tiny images) a linear classifier on the global average of several
    stages' outputs, concatenated, often does better. ``tap_blocks`` are the block stages tapped
    (their outputs are averaged over space), and the last stage's pooled ``conv_head`` features are
    always included. Only the forward pass and the classifier's width change: parameter names,
    ``group_matcher`` and ``get_classifier`` are the plain model's, so freezing, optimizer groups
    and saved weights work as for any timm EfficientNet. ``multi_stage_features`` is the whole
    feature extractor, one step for ``models.prefix.model_steps`` (cached when frozen).
    """

    tap_blocks: tuple[int, ...] = ()

    def multi_stage_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.tap_blocks:
                taps.append(x.mean(dim=(2, 3)))
        x = self.bn2(self.conv_head(x))
        taps.append(x.mean(dim=(2, 3)))
        return torch.cat(taps, dim=1)

    def multi_stage_head(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return cast(torch.Tensor, self.classifier(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multi_stage_head(self.multi_stage_features(x))


def multi_stage_taps(n_blocks: int) -> tuple[int, ...]:
    """Block stages tapped by ``multi_stage``: from a third of the way down to the last."""
    return tuple(range(n_blocks // 3, n_blocks))


def make_multi_stage(model: nn.Module, num_classes: int, *, name: str) -> nn.Module:
    """Turn a timm EfficientNet into a ``MultiStageEfficientNet`` in place (a new, wider classifier).

    Raises:
        UnsupportedHeadError: not an EfficientNet.
    """
    if isinstance(model, MultiStageEfficientNet):
        return model
    if not isinstance(model, EfficientNet):
        raise UnsupportedHeadError(name, "head_features='multi_stage'", "only EfficientNets are supported")
    taps = multi_stage_taps(len(model.blocks))
    with torch.no_grad():
        x = torch.zeros(1, 3, 32, 32)
        x = model.bn1(model.conv_stem(x))
        width = 0
        was_training = model.training
        model.eval()
        for i, block in enumerate(model.blocks):
            x = block(x)
            if i in taps:
                width += x.shape[1]
        model.train(was_training)
    width += int(model.num_features)
    model.__class__ = MultiStageEfficientNet
    cast(Any, model).tap_blocks = taps
    old = cast(Any, model).get_classifier()
    model.classifier = nn.Linear(width, num_classes).to(old.weight.device)  # type: ignore[assignment]
    return model


# --------------------------------------------------------------------------- the classifier


def _classifier_path(model: nn.Module) -> str:
    classifier = cast(Any, model).get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            return name
    raise LookupError("get_classifier() is not a submodule of the model")


def _pool_path(model: nn.Module) -> str | None:
    # The head's global pool sits at `global_pool` (EfficientNet, MobileNetV3, ResNet) or
    # `head.global_pool` (ConvNeXt); ViT pools tokens and has none.
    for path in ("global_pool", "head.global_pool"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, SelectAdaptivePool2d):
            return path
    return None


def apply_head(model: nn.Module, head: HeadConfig, *, name: str) -> nn.Module:
    """Put the head's DropConnect classifier and pooling into a timm model, in place.

    ``drop_rate`` and ``drop_path`` are construction arguments (``create_backbone``); this swaps
    the layers the options name: the classifier for a ``DropConnectLinear`` with the same weights
    when ``drop_connect > 0``, the global pool for a ``FractionalMaxAvgPool2d`` when
    ``pool == 'fractional_max'``. timm's ``reset_classifier(n)`` puts a plain ``nn.Linear`` (and, for
    most backbones, the average pool) back; call this again after it. Applying it twice is harmless.

    Args:
        model: a timm classifier (``get_classifier``).
        head: the head to build.
        name: the backbone's name, for error messages.

    Returns:
        ``model``.

    Raises:
        UnsupportedHeadError: the backbone has no linear classifier or no spatial global pool.
    """
    if head.drop_connect > 0:
        path = _classifier_path(model)
        classifier = model.get_submodule(path)
        if isinstance(classifier, DropConnectLinear):
            classifier.p = head.drop_connect
        elif not isinstance(classifier, nn.Linear):
            raise UnsupportedHeadError(
                name, f"drop_connect={head.drop_connect}", f"its classifier is a {type(classifier).__name__}"
            )
        else:
            model.set_submodule(path, DropConnectLinear.from_linear(classifier, head.drop_connect))
    if head.pool == "fractional_max" and not any(isinstance(m, FractionalMaxAvgPool2d) for m in model.modules()):
        pool_path = _pool_path(model)
        pool = model.get_submodule(pool_path) if pool_path else None
        if pool_path is None or not isinstance(pool, SelectAdaptivePool2d) or pool.pool_type != "avg":
            raise UnsupportedHeadError(
                name, "head_pool='fractional_max'", "it has no global average pooling over a feature map; use 'avg'"
            )
        flatten = pool(torch.zeros(1, 1, 2, 2)).ndim == 2  # MobileNetV3 and ConvNeXt keep [N, C, 1, 1]
        model.set_submodule(pool_path, FractionalMaxAvgPool2d(flatten=flatten))
    return model


def create_classifier(
    name: str, *, weights: str, num_classes: int, head: HeadConfig, image_size: int | None = None
) -> nn.Module:
    """A zoo backbone with a fresh ``num_classes`` classifier and the regularised head ``head``.

    Rebuilding with the same ``name``, ``num_classes``, ``head`` and ``image_size`` (and
    ``weights='none'``) gives a model whose ``state_dict`` has the same keys and shapes, so a saved
    model loads into it; ``get_classifier()`` returns the new classifier and
    ``group_matcher`` groups it with the head, as in the plain timm model.

    Args:
        name: backbone name (a key of ``BACKBONES``).
        weights: ``bundled``, ``hub`` or ``none`` (see ``create_backbone``).
        num_classes: outputs of the classifier.
        head: the head options (``HeadConfig.from_spec`` or ``HeadConfig.from_dict``).
        image_size: input size (only fixed-input models such as ViT depend on it).

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        UnknownNameError: unknown backbone or weight source.
        WeightsUnavailableError: the weights cannot be obtained here.
        UnsupportedHeadError: an option the backbone cannot take (a ``ValueError``).
    """
    model = create_backbone(
        name,
        weights=weights,
        num_classes=num_classes,
        drop_rate=head.drop_rate,
        drop_path_rate=head.drop_path,
        image_size=image_size,
    )
    if head.drop_path > 0 and not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules()):
        raise UnsupportedHeadError(name, f"drop_path={head.drop_path}", "it has no stochastic-depth blocks")
    if head.features == "multi_stage":
        if head.pool != "avg":
            raise UnsupportedHeadError(name, "head_features='multi_stage'", "it averages every stage; use pool 'avg'")
        make_multi_stage(model, num_classes, name=name)
    return apply_head(model, head, name=name)


# --------------------------------------------------------------------------- the objective


def train_criterion(spec: TrainSpec) -> Criterion:
    """The training loss of ``spec``: ``loss(logits, target)``, averaged over the batch.

    Integer class targets ``[N]`` get cross-entropy with ``spec.label_smoothing``; soft targets
    ``[N, C]`` (from ``batch_mixer``, which folds the label smoothing into them) get timm's
    ``SoftTargetCrossEntropy``. Dispatching on the target keeps a batch the mixer did not touch
    correct too. Validation loss stays plain cross-entropy.

    Args:
        spec: the job (``label_smoothing``).

    Returns:
        The loss function.
    """
    smoothing = float(spec.label_smoothing)
    soft = SoftTargetCrossEntropy()

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2 and target.is_floating_point():
            return cast(torch.Tensor, soft(logits, target))
        return F.cross_entropy(logits, target, label_smoothing=smoothing)

    return criterion


def batch_mixer(augment: AugmentSpec, num_classes: int, label_smoothing: float = 0.0) -> BatchMixer | None:
    """Mixup / CutMix of a training batch with timm's ``Mixup``, or ``None`` when both are off.

    One mixing weight per batch, drawn from Beta(alpha, alpha); with both alphas > 0 each batch
    uses CutMix or mixup with equal odds. Image ``i`` is mixed with image ``N - 1 - i`` and the
    targets become ``lam * onehot(y_i) + (1 - lam) * onehot(y_partner)``, smoothed by
    ``label_smoothing``.

    Odd batches (``np.array_split`` makes sizes differ by one): timm's ``Mixup`` asserts an even
    batch, so the batch is padded with a copy of its last image, mixed, and the copy dropped. No
    image is lost, every target still describes its own mixed image, and image 0 (whose partner is
    the copy) is mixed with the last image rather than left out; a 1-image batch is mixed with itself,
    i.e. left as it is with a smoothed one-hot target.

    The draws come from numpy's global RNG (``np.random``, as in timm), so seed and checkpoint it
    for reproducible runs.

    Args:
        augment: the job's augmentation (``mixup_alpha``, ``cutmix_alpha``).
        num_classes: width of the soft targets.
        label_smoothing: smoothing folded into the soft targets.

    Returns:
        ``mix(x, y) -> (x_mixed, y_soft)`` for a normalised float batch ``x [N, C, H, W]`` and integer
        labels ``y [N]``, giving a new ``x_mixed`` (``x`` is left untouched) and float ``y_soft
        [N, num_classes]`` whose rows sum to 1; or ``None`` when ``augment`` does not mix.
    """
    if not augment.mixes:
        return None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    mixup = Mixup(
        mixup_alpha=augment.mixup_alpha,
        cutmix_alpha=augment.cutmix_alpha,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=_rate("label_smoothing", label_smoothing),
        num_classes=num_classes,
    )

    def mix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not x.is_floating_point():
            raise ValueError(f"batch_mixer needs a float (normalised) batch, got {x.dtype}")
        n = len(x)
        if n == 0:
            raise ValueError("batch_mixer got an empty batch")
        if n % 2:
            x_mixed, y_soft = mixup(torch.cat([x, x[-1:]]), torch.cat([y, y[-1:]]))
            return x_mixed[:n], y_soft[:n]
        return cast(tuple[torch.Tensor, torch.Tensor], mixup(x.clone(), y))

    return mix


def active_drop_paths(modules: list[nn.Module]) -> int:
    """Residual blocks among ``modules`` whose branch stochastic depth can drop (timm ``DropPath``)."""
    seen: set[int] = set()
    for root in modules:
        for block in root.modules():
            dp = getattr(block, "drop_path", None)
            if isinstance(dp, DropPath) and dp.drop_prob > 0 and getattr(block, "has_skip", True):
                seen.add(id(block))
    return len(seen)
