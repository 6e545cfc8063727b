"""``passes.fixed_length`` on a tiny exported graph: which size arguments hold a fixed sequence length."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes.fixed_length import check_fixed_length, fixed_sizes, has_length
from passes.sites import find_sites

aten = torch.ops.aten


class Tiny(nn.Module):
    """A fixed sequence of ``seq`` positions, 4 wide, 2 heads of 2: view, mask from arange, reshape."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).view(x.shape[0], self.seq, 2, 2)
        keep = torch.arange(self.seq) >= 0
        return h.reshape(x.shape[0], self.seq, 4) * keep[None, :, None]


def _module(seq: int = 5) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=3)
    ep = torch.export.export(Tiny(seq), (torch.randn(3, seq, 4),), dynamic_shapes=({0: batch},))
    return ep.module()


def test_sizes_at_sequence_positions_are_found_and_others_are_not():
    graph = _module().graph
    found = {n.target: fixed_sizes(n, 5) for n in graph.nodes if n.op == "call_function"}
    assert found[aten.view.default] == [1]
    assert found[aten.reshape.default] == [1]
    assert found[aten.arange.default] == [-1]
    assert found[aten.linear.default] == []
    ambiguous = next(n for n in _module(seq=2).graph.nodes if n.target is aten.view.default)
    with pytest.raises(ValueError, match="cannot be told apart"):  # 2 positions, 2 heads of 2
        fixed_sizes(ambiguous, 2)
    proj = next(n for n in graph.nodes if n.target is aten.linear.default)
    assert has_length(proj, 5) and not has_length(proj, 3)


def test_a_length_equal_to_a_projection_width_is_refused():
    sites = find_sites(_module())
    assert [(s.in_features, s.out_features) for s in sites] == [(4, 4)]
    check_fixed_length(5, sites)
    with pytest.raises(ValueError, match="cannot be told apart"):
        check_fixed_length(4, sites)
