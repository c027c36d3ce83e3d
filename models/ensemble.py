"""An ensemble that averages its members' class probabilities, and how its members are chosen and averaged.

Members fine-tuned from the same pretrained backbone with the same frozen layers carry identical
weights in that frozen prefix; the ensemble finds the longest such shared prefix at construction
(``model_steps`` + ``torch.equal`` over the prefix's parameters and buffers) and runs it once per
batch, then each member's own remainder.

``greedy_selection`` picks members on validation (Caruana et al.); ``polyak`` keeps the running
Polyak (EMA) average of one member's weights during training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .evaluation import negative_log_likelihood
from .prefix import Step, forward_steps, model_steps

Norm = tuple[Sequence[float], Sequence[float]]


class _Renormalize(nn.Module):
    """Maps input normalised with one (mean, std) onto another, exactly (a per-channel affine map)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, source: Norm, target: Norm) -> None:
        super().__init__()
        s_mean, s_std = torch.tensor(source[0]), torch.tensor(source[1])
        t_mean, t_std = torch.tensor(target[0]), torch.tensor(target[1])
        # Not persistent: the state dict stays ``members.<i>.*`` only; these come from the manifest.
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _same_adapter(a: nn.Module, b: nn.Module) -> bool:
    if isinstance(a, _Renormalize) and isinstance(b, _Renormalize):
        return torch.equal(a.scale, b.scale) and torch.equal(a.shift, b.shift)
    return isinstance(a, nn.Identity) and isinstance(b, nn.Identity)


def _same(a: Norm, b: Norm) -> bool:
    return tuple(a[0]) == tuple(b[0]) and tuple(a[1]) == tuple(b[1])


class Ensemble(nn.Module):
    """Members' softmax probabilities, averaged (not their logits).

    State-dict keys are ``members.<i>.<member key>``, the layout of the saved artifact.

    Args:
        members: classifiers with the same number of outputs.
        input_norm: ``(mean, std)`` the input is normalised with; only needed with ``member_norms``.
        member_norms: ``(mean, std)`` each member was trained with, when they differ from
            ``input_norm`` (e.g. an ensemble mixing backbones with other ImageNet statistics);
            the input is re-normalised for each such member.
        share_prefix: run a frozen prefix that members share only once per batch.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        *,
        input_norm: Norm | None = None,
        member_norms: Sequence[Norm] | None = None,
        share_prefix: bool = True,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        if member_norms is not None and len(member_norms) != len(members):
            raise ValueError(f"{len(members)} members but {len(member_norms)} member_norms")
        adapters: list[nn.Module] = []
        for i in range(len(members)):
            norm = member_norms[i] if member_norms is not None else None
            if norm is None or input_norm is None or _same(norm, input_norm):
                adapters.append(nn.Identity())
            else:
                adapters.append(_Renormalize(input_norm, norm))
        self.adapters = nn.ModuleList(adapters)
        self.share_prefix = share_prefix
        self._groups: list[tuple[int, list[int]]] | None = None  # (shared steps, member indices)
        self._steps: list[list[Step] | None] = [model_steps(m) for m in self.members]

    def _state_equal(self, a: Step, b: Step) -> bool:
        ta = [t for m in a.modules for t in (*m.parameters(), *m.buffers())]
        tb = [t for m in b.modules for t in (*m.parameters(), *m.buffers())]
        return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True))

    def shared_groups(self) -> list[tuple[int, list[int]]]:
        """Members that share a prefix: ``(steps shared, [member indices])``, every member once.

        Computed on first use (weights must be loaded by then) and kept; call ``reset_sharing``
        after changing weights.
        """
        if self._groups is not None:
            return self._groups
        groups: list[tuple[int, list[int]]] = []
        left = list(range(len(self.members)))
        while left:
            lead = left.pop(0)
            lead_steps = self._steps[lead]
            group, shared = [lead], 0
            if self.share_prefix and lead_steps is not None:
                for j in list(left):
                    steps_j = self._steps[j]
                    if (
                        steps_j is None
                        or type(self.members[j]) is not type(self.members[lead])
                        or type(self.adapters[j]) is not type(self.adapters[lead])
                        or not _same_adapter(self.adapters[j], self.adapters[lead])
                        or len(steps_j) != len(lead_steps)
                    ):
                        continue
                    k = 0
                    limit = len(lead_steps) - 1 if len(group) == 1 else shared
                    while k < limit and self._state_equal(lead_steps[k], steps_j[k]):
                        k += 1
                    if k > 0:
                        shared = k if len(group) == 1 else min(shared, k)
                        group.append(j)
                        left.remove(j)
            groups.append((shared if len(group) > 1 else 0, group))
        self._groups = groups
        return groups

    def reset_sharing(self) -> None:
        """Forget the shared-prefix analysis (after loading other weights)."""
        self._groups = None

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's probabilities, ``float32 [M, N, C]``; a shared frozen prefix runs once."""
        out: list[torch.Tensor | None] = [None] * len(self.members)
        for shared, group in self.shared_groups():
            lead = group[0]
            xa = self.adapters[lead](x)
            if shared == 0:
                for j in group:
                    out[j] = self.members[j](self.adapters[j](x)).float().softmax(dim=-1)
                continue
            lead_steps = self._steps[lead]
            assert lead_steps is not None
            h = forward_steps(lead_steps, xa, 0, shared)
            for j in group:
                steps_j = self._steps[j]
                assert steps_j is not None
                out[j] = forward_steps(steps_j, h, shared).float().softmax(dim=-1)
        return torch.stack([o for o in out if o is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average class probabilities ``float32 [N, C]``; rows sum to 1."""
        return self.member_probs(x).mean(dim=0)


def greedy_selection(member_probs: list[np.ndarray], labels: np.ndarray) -> tuple[list[int], list[float]]:
    """Greedy forward selection of ensemble members on validation (Caruana et al., 2004).

    Starts from the member with the lowest validation NLL and keeps adding the member whose
    addition lowers the NLL of the averaged probabilities most, while it does (no repeats).

    Returns:
        The chosen member indices in the order added, and the NLL after each addition.
    """
    left = list(range(len(member_probs)))
    chosen: list[int] = []
    path: list[float] = []
    total = np.zeros_like(member_probs[0], dtype=np.float64)
    best = math.inf
    while left:
        scores = [(negative_log_likelihood((total + member_probs[j]) / (len(chosen) + 1), labels), j) for j in left]
        score, j = min(scores)
        if chosen and score >= best - 1e-9:
            break
        chosen.append(j)
        left.remove(j)
        total += member_probs[j]
        best = score
        path.append(score)
    return chosen, path


def polyak(model: nn.Module, decay: float) -> Any:
    """Polyak averaging: timm's ``ModelEmaV3`` of ``model``, ``ema = decay * ema + (1 - decay) * w``
    after every optimizer step (``.update(model)``), buffers included, no warm-up of the decay."""
    from timm.utils.model_ema import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=False)
