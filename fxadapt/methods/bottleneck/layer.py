"""``Bottleneck``: one bottleneck adapter together with the residual step it replaces."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import Activation
from .config import BnConfig
from .phm import PHMLayer


class Bottleneck(nn.Module):
    """One bottleneck adapter together with the residual step it replaces.

    ``forward(h, r, norm, shared)``: ``h`` is the block's output (after its dropout), ``r`` the
    residual input, ``norm`` the block's post-LN layer norm as ``(shape, weight, bias, eps)`` or
    None (pre-LN), ``shared`` the adapter's shared PHM tensors or None.
    """

    def __init__(self, hidden: int, down: int, config: BnConfig) -> None:
        super().__init__()
        self.parallel = config.is_parallel
        self.original_ln_before = config.original_ln_before
        self.original_ln_after = config.original_ln_after
        self.residual_before_ln = config.residual_before_ln
        self.adapter_residual_before_ln = config.adapter_residual_before_ln
        self.stochastic_depth = float(config.stochastic_depth)
        layers: list[nn.Module] = []
        if config.ln_before:
            layers.append(nn.LayerNorm(hidden))
        if config.phm_layer:
            layers.append(PHMLayer(hidden, down, "down", config))
            self.adapter_up: nn.Module = PHMLayer(down, hidden, "up", config)
        else:
            layers.append(nn.Linear(hidden, down))
            self.adapter_up = nn.Linear(down, hidden)
        layers.append(Activation(config.non_linearity))
        self.adapter_down = nn.Sequential(*layers)
        if config.scaling == "learned":
            self.scaling: Any = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden))
        else:
            self.scaling = float(config.scaling)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        self.gate = nn.Linear(hidden, 1) if config.use_gating else None
        self.dropout = nn.Dropout(config.dropout)
        self._init(config.init_weights)

    def _linears(self) -> tuple[list[nn.Module], nn.Module]:
        downs = [m for m in self.adapter_down if isinstance(m, (nn.Linear, PHMLayer))]
        return downs, self.adapter_up

    def _init(self, init: str) -> None:
        downs, up = self._linears()
        with torch.no_grad():
            if init == "bert":
                for m in [*self.adapter_down, up, *([self.gate] if self.gate is not None else [])]:
                    if isinstance(m, nn.Linear):
                        m.weight.normal_(mean=0.0, std=0.02)
                        m.bias.zero_()
            elif init == "mam_adapter":
                for m in downs:
                    if isinstance(m, nn.Linear):
                        nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                        nn.init.zeros_(m.bias)
                if isinstance(up, nn.Linear):
                    nn.init.zeros_(up.weight)
                    nn.init.zeros_(up.bias)
                else:  # PHM: zero the factor next to the output, so that the update starts at 0
                    for p in ("W_right", "W"):
                        if hasattr(up, p):
                            getattr(up, p).zero_()
                    if up.b is not None:
                        up.b.zero_()
                if self.gate is not None:
                    self.gate.weight.normal_(mean=0.0, std=0.02)
                    self.gate.bias.zero_()
            else:  # houlsby
                for m in [*downs, up]:
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(m.bias)

    def _down(self, x: torch.Tensor, shared: Any) -> torch.Tensor:
        for m in self.adapter_down:
            x = m(x, shared) if isinstance(m, PHMLayer) else m(x)
        return x

    def _up(self, x: torch.Tensor, shared: Any) -> torch.Tensor:
        return self.adapter_up(x, shared) if isinstance(self.adapter_up, PHMLayer) else self.adapter_up(x)

    def _drop_path(self, up: torch.Tensor) -> torch.Tensor:
        """torchvision's ``StochasticDepth(p, "row")``: drop the whole update of a sample."""
        if not self.training or self.stochastic_depth == 0.0:
            return up
        keep = 1.0 - self.stochastic_depth
        noise = torch.empty([up.shape[0]] + [1] * (up.dim() - 1), dtype=up.dtype, device=up.device)
        return up * noise.bernoulli_(keep).div_(keep)

    def forward(
        self,
        h: torch.Tensor,
        r: torch.Tensor,
        norm: tuple | None = None,
        shared: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x, around = self.pre(h, r, norm)
        return self.post(self.body(x, around, shared), h, r, norm)

    # The parts of the residual step, as AdapterHub splits them (pre_forward, forward, post_forward);
    # composition blocks call them separately (passes/bottleneck.py).
    def pre(
        self, h: torch.Tensor, r: torch.Tensor, norm: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's input and the residual around it, from the block output ``h`` and input ``r``."""
        if self.parallel:
            return r, r
        x = h
        around = h if self.residual_before_ln is True else None
        if self.original_ln_before:
            x = h + r
            if self.residual_before_ln == "post_add":
                around = x
            if norm is not None:
                x = _layer_norm(x, norm)
        return x, x if around is None else around

    def query(self, h: torch.Tensor, r: torch.Tensor, norm: tuple | None, before_ln: bool) -> torch.Tensor:
        """AdapterFusion's query: the adapter's input, or the block output before the layer norm."""
        if self.parallel:
            return r
        return h if before_ln else self.pre(h, r, norm)[0]

    def up(self, x: torch.Tensor, shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The scaled up-projection, before dropout and residual: what AdapterFusion attends over."""
        up = self._up(self._down(x, shared), shared)
        up = self._drop_path(up) if not self.parallel else up
        return up * self.scaling

    def body(
        self, x: torch.Tensor, around: torch.Tensor, shared: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The adapter: its update, gated, with the residual ``around`` and its own layer norm."""
        out = self.dropout(self.up(x, shared))
        if self.gate is not None:
            gate = torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
            out = out * gate
        if self.parallel:
            if hasattr(self, "adapter_norm_after"):
                out = self.adapter_norm_after(out)
            return out
        if self.adapter_residual_before_ln:
            out = out + around
        if hasattr(self, "adapter_norm_after"):
            out = self.adapter_norm_after(out)
        if not self.adapter_residual_before_ln:
            out = out + around
        return out

    def post(
        self, out: torch.Tensor, h: torch.Tensor, r: torch.Tensor, norm: tuple | None = None
    ) -> torch.Tensor:
        """The block's own residual step after the adapter(s); a parallel adapter adds the block output."""
        if self.parallel:
            out = out + h
        if self.original_ln_after:
            out = out + r
            if norm is not None:
                out = _layer_norm(out, norm)
        return out


def _layer_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    shape, weight, bias, eps = norm
    return F.layer_norm(x, shape, weight, bias, eps)
