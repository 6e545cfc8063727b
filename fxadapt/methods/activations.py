"""Activation functions by AdapterHub's names, wrapped so parameter names match AdapterHub's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def activation_names() -> list[str]:
    return sorted({*ACT2FN.keys(), "leakyrelu"})


class Activation(nn.Module):
    """AdapterHub's activation wrapper (the function under ``.f``, so parameter names match)."""

    def __init__(self, name: str | None) -> None:
        super().__init__()
        name = name.lower() if name else None
        if name is None:
            self.f = nn.Identity()
        elif name == "leakyrelu":
            self.f = F.leaky_relu
        else:
            self.f = ACT2FN[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)
