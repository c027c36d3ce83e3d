"""An ensemble that averages its members' class probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

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
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        *,
        input_norm: Norm | None = None,
        member_norms: Sequence[Norm] | None = None,
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

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's probabilities, ``float32 [M, N, C]``."""
        return torch.stack([m(a(x)).float().softmax(dim=-1) for m, a in zip(self.members, self.adapters, strict=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average class probabilities ``float32 [N, C]``; rows sum to 1."""
        return self.member_probs(x).mean(dim=0)
