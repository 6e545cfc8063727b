"""DoRA: LoRA with the adapted weight split into magnitude and direction (Liu et al., 2024).

``W' = m · (W + s·BA) / ‖W + s·BA‖`` row-wise, ``m`` a trained magnitude per output, initialised to
the row norms of ``W`` (so a fresh adapter is the identity). Config names and defaults follow
AdapterHub's ``DoRAConfig`` (``"dora"``). The two references compute it differently, and
``formula`` picks which (both merge exactly):

- ``"adapterhub"`` (AdapterHub 1.3): ``m / ‖W + BA‖ · (Wx + b + s·BAx)``: the norm without the
  scaling ``s``, the bias inside the rescaling, the norm differentiated;
- ``"peft"`` (PEFT's ``use_dora=True``, the paper): ``m / ‖W + s·BA‖ · (Wx + s·BAx) + b``, the norm
  treated as a constant in training.

The module gets the projection's weight and bias from the graph (``passes.lora.insert_with_weight``);
AdapterHub names the magnitude ``<module>.loras.<name>.m.weight`` (``[out, 1]``), PEFT
``<module>.lora_magnitude_vector`` (``[out]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from passes.lora import insert_with_weight
from passes.sites import Site, SiteTable

from ..config import check
from ..errors import AdapterFileError
from ..formats.keys import site_for
from ..registry import Method, register
from .lora import LoRA, LoRAConfig, select
from .lora.naming import lora_key, lora_name
from .lora.peft import _MAGNITUDE, lora_options, lora_to_peft

FORMULAS = ("adapterhub", "peft")


@dataclasses.dataclass
class DoRAConfig(LoRAConfig):
    """AdapterHub's ``DoRAConfig``: LoRA's options with ``use_dora=True``; ``formula`` is fxadapt's."""

    foreign_defaults = {"vera_d": None, "vera_b": None, "dtype": None, "init_weights_seed": None}
    local_options = {**LoRAConfig.local_options, "formula": "adapterhub"}

    use_dora: bool = True
    formula: str = "adapterhub"

    def validate(self) -> None:
        super().validate()
        check(self.use_dora is True, "DoRAConfig.use_dora must be True (use LoRAConfig for plain LoRA)")
        check(
            self.formula in FORMULAS,
            f"DoRAConfig.formula must be one of {list(FORMULAS)}, got {self.formula!r}",
        )
        check(self.composition_mode == "add", "DoRA needs composition_mode='add'")
        check(
            not self.use_gating, "DoRA with use_gating is not supported (AdapterHub has no gated DoRA either)"
        )


class DoRA(LoRA):
    """LoRA plus the magnitude ``m``; called as ``module(x, y, weight, bias)``."""

    def __init__(self, site: Site, config: DoRAConfig, sections: Any, weight: torch.Tensor, dtype, device):
        super().__init__(site.in_features, site.out_features, config, sections, dtype, device)
        self.formula = config.formula
        self.transposed = site.transposed
        self.m = nn.Linear(1, site.out_features, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.m.weight.copy_(self._oriented(weight.detach()).norm(dim=1, keepdim=True).to(self.m.weight))

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.transposed else weight

    def rescale(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ‖W + ΔW‖`` per output row (``ΔW`` unscaled in AdapterHub's formula)."""
        delta = self.full_B() @ self.lora_A
        if self.formula == "peft":
            delta = (delta * self.scaling).detach()
        norm = (self._oriented(weight).to(delta.dtype) + delta).norm(dim=1)
        if self.formula == "peft":
            norm = norm.detach()
        return self.m.weight.reshape(-1) / norm

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.full_B()) * self.scaling
        scale = self.rescale(weight).to(y.dtype)
        if self.formula == "peft" and bias is not None:
            return scale * (y - bias + delta) + bias
        return scale * (y + delta)


def build(config: DoRAConfig, sites: SiteTable, dtype: torch.dtype, device: Any) -> dict:
    modules = {}
    for key, (site, roles) in select(config, sites).items():
        check(
            site.expert is None, f"DoRA cannot adapt the expert parameter {site.weight} (PEFT cannot either)"
        )
        sections = None
        if site.fused and config.fused_qkv == "split":
            check(site.sections is not None, site.refusal())
            sections = tuple(site.columns(r) for r in roles)
        weight = _weight_of(sites, site)
        modules[key] = DoRA(site, config.for_site(key), sections, weight, dtype, device)
    check(bool(modules), "DoRA found no site to adapt: check attn_matrices/leave_out against model.sites()")
    return modules


def _weight_of(sites: Any, site: Site) -> torch.Tensor:
    parameter = getattr(sites, "parameter", None)
    check(
        parameter is not None, "DoRA needs the base weights to initialise its magnitudes: use an AdaptedModel"
    )
    return parameter(site.weight)


def fold(module: DoRA, weight: torch.Tensor, bias: torch.Tensor | None, site: Site) -> None:
    """``W ← m/‖·‖ · (W + s·BA)`` (and AdapterHub's formula rescales the bias too): exact."""
    scale = module.rescale(weight).to(weight.dtype)
    delta = module.delta_weight().to(weight.dtype)
    if site.transposed:
        weight.add_(delta.t()).mul_(scale)
    else:
        weight.add_(delta).mul_(scale[:, None])
    if bias is not None and module.formula == "adapterhub":
        bias.mul_(scale)


def adapterhub_key(key: str, sites: Any, config: Any = None) -> str | None:
    return lora_key(key, sites, config)


def adapterhub_name(key: str, sites: Any, config: Any, name: str) -> str:
    check(
        config.formula == "adapterhub",
        "DoRA with formula='peft' computes what PEFT computes, not AdapterHub; save it with format='peft' "
        "or 'fxadapt'",
    )
    return lora_name(key, sites, config, name)


def from_peft(raw: dict, tensors: dict, sites: Any) -> tuple[DoRAConfig, dict]:
    """PEFT's ``use_dora=True`` LoRA: LoRA's tensors, and its magnitudes onto ``<site>.m.weight``."""
    options, out = lora_options(raw, tensors, sites)
    for key, t in tensors.items():
        m = _MAGNITUDE.match(key)
        if m is not None:
            out[f"{site_for(m['path'], sites)}.m.weight"] = t.reshape(-1, 1)
    missing = [k for k in options["target_sites"] if f"{k}.m.weight" not in out]
    if missing:
        raise AdapterFileError(f"PEFT DoRA file lacks lora_magnitude_vector for {missing[:3]}")
    return DoRAConfig(**options, formula="peft"), out


def to_peft(adapter: Any, model: Any) -> tuple[dict, dict]:
    check(
        adapter.config.formula == "peft",
        "DoRA with formula='adapterhub' (AdapterHub's: bias inside the rescaling, norm without the scaling) "
        "computes something PEFT's DoRA does not; save it with format='adapterhub' or 'fxadapt', or use "
        "formula='peft'",
    )
    config, tensors = lora_to_peft(adapter, model)
    for key, module in adapter.items():
        tensors[f"base_model.model.{key}.lora_magnitude_vector"] = module.m.weight.detach().reshape(-1)
    return {**config, "use_dora": True}, tensors


DORA = register(
    Method(
        "dora",
        DoRAConfig,
        build,
        insert_with_weight,
        fold,
        adapterhub_key=adapterhub_key,
        adapterhub_name=adapterhub_name,
        peft_type="LORA",
        from_peft=from_peft,
        to_peft=to_peft,
        adapterhub_when=lambda c: (
            c.get("architecture") == "lora" and bool(c.get("use_dora")) and not _vera(c)
        ),
        peft_when=lambda raw: bool(raw.get("use_dora")),
    )
)


def _vera(config: dict) -> bool:
    return isinstance(config.get("vera_d"), float) or isinstance(config.get("vera_b"), float)
