"""The LoRA method: which sites a config adapts, the modules it builds, how they fold into weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from passes.lora import insert_lora
from passes.sites import Site, SiteTable

from ...config import check
from ...registry import Method, register
from .config import LoRAConfig
from .layer import LoRA, LoRAScale
from .naming import lora_key, lora_name
from .peft import from_peft, lora_to_peft

# the blocks passes/lora.py expands: a Stack chains updates, Sum adds them (PEFT), Average averages;
# "route": per-row routing (adapter_names=), "drop": AdapterDrop's skip_layers as a tensor
COMPOSE = frozenset({"stack", "sum", "average", "rows", "split", "route", "drop"})


def select(config: LoRAConfig, sites: SiteTable) -> dict[str, tuple[Site, tuple[str, ...]]]:
    """The sites this config adapts, each with the roles (matrices) adapted there."""
    if config.target_sites is not None:
        table = sites.by_key()
        missing = [k for k in config.target_sites if k not in table]
        check(not missing, f"LoRAConfig.target_sites names unknown sites {missing}; see model.sites()")
        return {k: (table[k], table[k].roles) for k in config.target_sites}
    wanted = set()
    if config.selfattn_lora:
        wanted |= set(config.attn_matrices)
    if config.intermediate_lora:
        wanted.add("ffn_in")
    if config.output_lora:
        wanted.add("ffn_out")
    chosen = {}
    for site in sites:
        if site.layer is None or site.layer in config.leave_out:
            continue
        roles = tuple(r for r in site.roles if r in wanted)
        if roles:
            chosen[site.key] = (site, roles)
    return chosen


def fit_sites(config: LoRAConfig, tensors: dict[str, torch.Tensor], sites: SiteTable) -> LoRAConfig:
    """The config for the sites an AdapterHub file adapts, when its role options pick others.

    AdapterHub chooses LoRA's FFN modules per model class (on Llama, ``intermediate_lora`` adapts
    ``down_proj`` and ``output_lora`` ``up_proj``, and ``gate_proj`` never), while fxadapt picks
    sites by role. A file is loaded as what it holds: its own sites, as ``target_sites``.
    """
    named = {k.rsplit(".", 1)[0] for k in tensors}
    chosen = set(select(config, sites))
    in_file = {k for k in sites.by_key() if k in named}
    if in_file == chosen or not in_file:
        return config
    return config.replace(target_sites=sorted(in_file), adapterhub_sites=True)


def build(config: LoRAConfig, sites: SiteTable, dtype: torch.dtype, device: Any) -> dict[str, nn.Module]:
    modules = {}
    for key, (site, roles) in select(config, sites).items():
        sections = None
        if site.fused and config.fused_qkv == "split":
            check(site.sections is not None, site.refusal())
            sections = tuple(site.columns(r) for r in roles)
        own = config.for_site(key)
        if config.composition_mode == "scale":
            modules[key] = LoRAScale(site.out_features, own, sections, dtype, device, site.in_features)
        else:
            modules[key] = LoRA(site.in_features, site.out_features, own, sections, dtype, device)
    check(bool(modules), "LoRA found no site to adapt: check attn_matrices/leave_out against model.sites()")
    return modules


def fold(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, site: Site) -> None:
    check(
        getattr(module, "gate", None) is None,
        "a gated LoRA/(IA)^3 (use_gating=True) scales its update by the input, so it cannot be merged",
    )
    if isinstance(module, LoRAScale):
        scale = module.vector().to(weight.dtype)
        weight.mul_(scale if site.transposed else scale[:, None])
        if bias is not None:
            bias.mul_(scale)
        return
    delta = module.delta_weight().to(weight.dtype)
    weight.add_(delta.T if site.transposed else delta)


LORA = register(
    Method(
        "lora",
        LoRAConfig,
        build,
        insert_lora,
        fold,
        adapterhub_key=lora_key,
        adapterhub_name=lora_name,
        adapterhub_fit=fit_sites,
        peft_type="LORA",
        from_peft=from_peft,
        compose=COMPOSE,
        to_peft=lora_to_peft,
    )
)
