"""Invertible coupling blocks for AdapterHub's invertible adapters (Pfeiffer et al., 2020, MAD-X).

Each block splits the last dimension into halves ``x1`` (``C//2``) and ``x2`` (the rest) and couples
them through small bottleneck MLPs (``Linear -> activation -> Linear``, hidden width
``dims_in // reduction_factor``), so that the block is exactly invertible: ``block(block(x), rev=True)
== x``. Parameter names (``F``/``G`` for NICE, ``s1``/``s2`` for GLOW) follow AdapterHub.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def subnet(
    dims_in: int, dims_out: int, act: Callable[[], nn.Module], reduction_factor: float
) -> nn.Sequential:
    width = int(dims_in // reduction_factor)
    return nn.Sequential(nn.Linear(dims_in, width), act(), nn.Linear(width, dims_out))


class NICECoupling(nn.Module):
    """Additive coupling: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``."""

    def __init__(self, channels: int, act: Callable[[], nn.Module], reduction_factor: float) -> None:
        super().__init__()
        self.len1, self.len2 = channels // 2, channels - channels // 2
        self.F = subnet(self.len2, self.len1, act, reduction_factor)
        self.G = subnet(self.len1, self.len2, act, reduction_factor)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.len1], x[..., self.len1 :]
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), -1)


class GLOWCoupling(nn.Module):
    """Affine coupling with soft-clamped scales, one subnet per half predicting ``[s, t]``."""

    def __init__(
        self, channels: int, act: Callable[[], nn.Module], reduction_factor: float, clamp: float = 5.0
    ) -> None:
        super().__init__()
        self.len1, self.len2 = channels // 2, channels - channels // 2
        self.clamp = clamp
        self.max_s, self.min_s = math.exp(clamp), math.exp(-clamp)
        self.s1 = subnet(self.len1, self.len2 * 2, act, reduction_factor)
        self.s2 = subnet(self.len2, self.len1 * 2, act, reduction_factor)

    def e(self, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.clamp * 0.636 * torch.atan(s / self.clamp))

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.len1], x[..., self.len1 :]
        if not rev:
            r2 = self.s2(x2)
            s2, t2 = r2[..., : self.len1], r2[..., self.len1 :]
            y1 = self.e(s2) * x1 + t2
            r1 = self.s1(y1)
            s1, t1 = r1[..., : self.len2], r1[..., self.len2 :]
            y2 = self.e(s1) * x2 + t1
        else:
            r1 = self.s1(x1)
            s1, t1 = r1[..., : self.len2], r1[..., self.len2 :]
            y2 = (x2 - t1) / self.e(s1)
            r2 = self.s2(y2)
            s2, t2 = r2[..., : self.len1], r2[..., self.len1 :]
            y1 = (x1 - t2) / self.e(s2)
        return torch.cat((y1, y2), -1)
