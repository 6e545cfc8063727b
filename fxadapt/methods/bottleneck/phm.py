"""Parameterized hypercomplex multiplication (PHM) layers: Compacter's down and up projections.

A PHM layer's ``[in, out]`` weight is a sum of Kronecker products ``H = Σ_i C_i ⊗ W_i`` with ``n``
rule matrices ``C_i`` (``[n, n]``) and ``n`` blocks ``W_i`` (``[in/n, out/n]``), so it stores
about ``in·out/n`` numbers instead of ``in·out`` (Zhang et al., 2021; Mahabadi et al., 2021). ``W_i``
can be factorized into a rank-``phm_rank`` product ``W_left @ W_right``, ``C`` into
``C_left @ C_right``; the rules (and optionally the ``W``) can be shared by all layers of an
adapter, in which case they live in one :class:`SharedPHM` module and reach every layer through
the graph. Parameter names and initialisation follow AdapterHub's ``PHMLayer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def kron_sum(rule: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_i rule[i] ⊗ w[i]`` for ``rule`` ``[n, n, n]`` and ``w`` ``[n, p, q]``: a ``[n·p, n·q]`` matrix."""
    n, p, q = w.shape
    return torch.einsum("bij,bkl->ikjl", rule, w).reshape(rule.shape[1] * p, rule.shape[2] * q)


def init_w(config: Any, *tensors: torch.Tensor) -> None:
    """Initialise W blocks (each ``[n, a, b]``) per ``hypercomplex_nonlinearity``, block by block."""
    kind = config.hypercomplex_nonlinearity
    with torch.no_grad():
        for t in tensors:
            for i in range(t.shape[0]):
                if kind in ("phm", "glorot-normal"):
                    nn.init.xavier_normal_(t[i])
                elif kind == "glorot-uniform":
                    nn.init.xavier_uniform_(t[i])
                else:
                    t[i].normal_(mean=0.0, std=config.phm_init_range)


def _rule(shape: tuple[int, ...], c_init: str, scale: float) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    with torch.no_grad():
        if c_init == "uniform":
            p.uniform_(-scale, scale)
        else:
            p.normal_(mean=0.0, std=scale)
    return p


class PHMLayer(nn.Module):
    """``y = x @ Σ_i C_i ⊗ W_i + b``; ``position`` ("down"/"up") picks the shared W, if shared."""

    def __init__(self, in_features: int, out_features: int, position: str, config: Any) -> None:
        super().__init__()
        n = config.phm_dim
        self.in_features, self.out_features, self.position = in_features, out_features, position
        self.n = n
        self.shared_rule = config.shared_phm_rule
        self.shared_w = config.shared_W_phm
        self.factorized_rule = config.factorized_phm_rule
        self.factorized_w = config.factorized_phm_W
        self.learn_phm = config.learn_phm
        if not self.shared_rule:
            if self.factorized_rule:
                self.phm_rule_left = _rule((n, n, 1), config.phm_c_init, 0.01)
                self.phm_rule_right = _rule((n, 1, n), config.phm_c_init, 0.01)
            else:
                self.phm_rule = _rule((n, n, n), config.phm_c_init, 0.01)
        a, b = in_features // n, out_features // n
        if not self.shared_w:
            if self.factorized_w:
                self.W_left = nn.Parameter(torch.empty(n, a, config.phm_rank))
                self.W_right = nn.Parameter(torch.empty(n, config.phm_rank, b))
                init_w(config, self.W_left, self.W_right)
            else:
                self.W = nn.Parameter(torch.empty(n, a, b))
                init_w(config, self.W)
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None

    def weight(self, shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The ``[in, out]`` matrix this layer multiplies by."""
        if self.shared_rule:
            rule = shared["phm_rule"]
        elif self.factorized_rule:
            rule = torch.bmm(self.phm_rule_left, self.phm_rule_right)
        else:
            rule = self.phm_rule
        if not self.learn_phm:
            rule = rule.detach()
        if self.shared_w:
            w = shared[f"W_{self.position}"]
        elif self.factorized_w:
            w = torch.bmm(self.W_left, self.W_right)
        else:
            w = self.W
        return kron_sum(rule, w)

    def forward(self, x: torch.Tensor, shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        y = torch.matmul(x, self.weight(shared))
        return y + self.b if self.b is not None else y


class SharedPHM(nn.Module):
    """The PHM rules (and W, with ``shared_W_phm``) shared by every layer of one adapter.

    Called once per forward pass without inputs; returns ``{"phm_rule", "W_down", "W_up"}`` (those
    that are shared), each already multiplied out if factorized.
    """

    def __init__(self, config: Any, hidden: int, down: int) -> None:
        super().__init__()
        n = config.phm_dim
        self.shared_rule, self.shared_w = config.shared_phm_rule, config.shared_W_phm
        self.factorized_rule, self.factorized_w = config.factorized_phm_rule, config.factorized_phm_W
        self.learn_phm = config.learn_phm
        # AdapterHub draws shared rules from normal(0, phm_init_range) or uniform(-1, 1).
        scale = config.phm_init_range if config.phm_c_init == "normal" else 1.0
        if self.shared_rule:
            if self.factorized_rule:
                self.phm_rule_left = _rule((n, n, 1), config.phm_c_init, scale)
                self.phm_rule_right = _rule((n, 1, n), config.phm_c_init, scale)
            else:
                self.phm_rule = _rule((n, n, n), config.phm_c_init, scale)
        if self.shared_w:
            a, b, r = hidden // n, down // n, config.phm_rank
            if self.factorized_w:
                self.W_down_left = nn.Parameter(torch.empty(n, a, r))
                self.W_down_right = nn.Parameter(torch.empty(n, r, b))
                self.W_up_left = nn.Parameter(torch.empty(n, b, r))
                self.W_up_right = nn.Parameter(torch.empty(n, r, a))
                init_w(config, self.W_down_left, self.W_down_right, self.W_up_left, self.W_up_right)
            else:
                self.W_down = nn.Parameter(torch.empty(n, a, b))
                self.W_up = nn.Parameter(torch.empty(n, b, a))
                init_w(config, self.W_down, self.W_up)

    def forward(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.shared_rule:
            if self.factorized_rule:
                rule = torch.bmm(self.phm_rule_left, self.phm_rule_right)
            else:
                rule = self.phm_rule
            out["phm_rule"] = rule if self.learn_phm else rule.detach()
        if self.shared_w:
            if self.factorized_w:
                out["W_down"] = torch.bmm(self.W_down_left, self.W_down_right)
                out["W_up"] = torch.bmm(self.W_up_left, self.W_up_right)
            else:
                out["W_down"], out["W_up"] = self.W_down, self.W_up
        return out
