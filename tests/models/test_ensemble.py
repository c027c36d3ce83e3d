"""The ensemble averages probabilities, not logits."""

from __future__ import annotations

import torch
from torch import nn

from models.ensemble import Ensemble


def _members(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Flatten(), nn.Linear(12, 5)) for _ in range(n)]


def test_forward_is_the_mean_of_member_softmaxes() -> None:
    members = _members(3)
    ensemble = Ensemble(members).eval()
    x = torch.randn(4, 3, 2, 2) * 3
    with torch.no_grad():
        probs = ensemble(x)
        logits = [m(x) for m in members]
    expected = torch.stack([lg.softmax(dim=-1) for lg in logits]).mean(dim=0)
    assert torch.allclose(probs, expected, atol=1e-7)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-6)
    assert not torch.allclose(probs, torch.stack(logits).mean(dim=0).softmax(dim=-1), atol=1e-4)
    assert list(ensemble.state_dict())[0].startswith("members.0.")


def test_members_with_other_normalisation_see_their_own_input() -> None:
    members = _members(2)
    a = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    b = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ensemble = Ensemble(members, input_norm=a, member_norms=[a, b]).eval()
    raw = torch.rand(4, 3, 2, 2)

    def norm(x: torch.Tensor, n: tuple) -> torch.Tensor:
        return (x - torch.tensor(n[0]).view(1, 3, 1, 1)) / torch.tensor(n[1]).view(1, 3, 1, 1)

    with torch.no_grad():
        expected = (members[0](norm(raw, a)).softmax(-1) + members[1](norm(raw, b)).softmax(-1)) / 2
        assert torch.allclose(ensemble(norm(raw, a)), expected, atol=1e-6)
    assert set(ensemble.state_dict()) == {k for k in ensemble.state_dict() if k.startswith("members.")}
