"""LoHa (Hyeon-Woo et al., 2022): the worked example of docs/adding-a-method.md, a whole method in one file.

``y = W x + (alpha/r) · ((w1_a w1_b) ⊙ (w2_a w2_b)) x``: a Hadamard product of two low-rank matrices,
PEFT's ``LoHaConfig`` for linear layers. In fxadapt this file would be ``fxadapt/methods/loha.py``
plus one import line in ``fxadapt/methods/__init__.py``; it lives in ``tests/`` to show that a
method needs nothing else (``tests/test_adding_a_method.py`` checks it against PEFT).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxadapt.config import AdapterConfig, check
from fxadapt.errors import AdapterFileError
from fxadapt.formats.keys import match_site
from fxadapt.registry import Method, register
from passes.lora import insert_lora
from passes.sites import Site, SiteTable

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")


# 1. The config: a dataclass with the names users know (PEFT's here) and checks that say what to do.
@dataclasses.dataclass
class LoHaConfig(AdapterConfig):
    """LoHa on the chosen projection roles."""

    architecture = "loha"

    r: int = 8
    alpha: float = 8
    target_roles: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    leave_out: list[int] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r >= 1, f"LoHaConfig.r must be an int >= 1, got {self.r!r}")
        check(self.alpha > 0, f"LoHaConfig.alpha must be > 0, got {self.alpha!r}")
        bad = [r for r in self.target_roles if r not in ROLES]
        check(not bad, f"LoHaConfig.target_roles has {bad}; valid: {list(ROLES)}")


# 2. The module: tensor math only (no Python branching on data), so it compiles with no graph break.
class LoHa(nn.Module):
    """The update for one projection; ``forward(x, y)`` gets the projection's input and output."""

    def __init__(self, in_features: int, out_features: int, config: LoHaConfig) -> None:
        super().__init__()
        r = config.r
        self.scaling = config.alpha / r
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_features))  # zero: the identity at init
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        return y + F.linear(x, self.delta_weight())


# 3. Build: one module per site the config picks, from the site table only (no model classes).
def build(config: LoHaConfig, sites: SiteTable, dtype: torch.dtype, device: Any) -> dict[str, nn.Module]:
    modules = {}
    for site in sites:
        if site.layer is None or site.layer in config.leave_out or site.fused:
            continue
        if any(r in config.target_roles for r in site.roles):
            modules[site.key] = LoHa(site.in_features, site.out_features, config).to(
                device=device, dtype=dtype
            )
    check(bool(modules), "LoHa found no site to adapt: check target_roles/leave_out against model.sites()")
    return modules


# 4. Merge: fold the update into the base weight (GPT-2's Conv1D stores it transposed).
def fold(module: LoHa, weight: torch.Tensor, bias: torch.Tensor | None, site: Site) -> None:
    delta = module.delta_weight().to(weight.dtype)
    weight.add_(delta.T if site.transposed else delta)


# 5. Foreign names: PEFT's ``base_model.model.<module>.hada_w1_a`` onto ``<site key>.hada_w1_a``.
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<param>hada_w[12]_[ab])(?:\.[^.]+)?$")


def from_peft(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[LoHaConfig, dict]:
    refused = [k for k in ("use_effective_conv2d", "rank_pattern", "alpha_pattern") if raw.get(k)]
    if refused or raw.get("rank_dropout") or raw.get("module_dropout"):
        raise AdapterFileError(f"PEFT LoHa options {refused or ['rank/module dropout']} are not supported")
    keys = [s.key for s in sites]
    out = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterFileError(f"PEFT tensor {key!r} is not a LoHa weight")
        out[f"{match_site(m['path'], keys)}.{m['param']}"] = t
    adapted = {k.rsplit(".", 1)[0] for k in out}
    roles = sorted({r for s in sites if s.key in adapted for r in s.roles})
    return LoHaConfig(r=int(raw["r"]), alpha=float(raw["alpha"]), target_roles=roles), out


# 6. Registration: the name users pass to add_adapter, the pass that inserts the modules (LoHa sits
# where LoRA sits, after a projection, so LoRA's pass serves), the fold, and PEFT's names.
LOHA = register(Method("loha", LoHaConfig, build, insert_lora, fold, peft_type="LOHA", from_peft=from_peft))
