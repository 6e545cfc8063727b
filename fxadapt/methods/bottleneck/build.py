"""Build a bottleneck config's modules: one ``Bottleneck`` per chosen residual site, plus the shared
PHM parameters (Compacter) and the invertible adapter, initialised as AdapterHub does."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from passes.bottleneck import INVERTIBLE, SHARED
from passes.sites import SiteTable

from ...config import check
from ...errors import ConfigError
from ..activations import Activation
from .config import BnConfig
from .coupling import GLOWCoupling, NICECoupling
from .layer import Bottleneck
from .phm import SharedPHM
from .sites import locations


def build(config: BnConfig, sites: SiteTable, dtype: torch.dtype, device: Any) -> dict[str, nn.Module]:
    name = type(config).__name__
    chosen = [
        loc for loc in locations(sites) if getattr(config, loc.kind) and loc.layer not in config.leave_out
    ]
    check(
        bool(chosen) or config.inv_adapter is not None,
        f"{name} found no site to adapt: check mh_adapter/output_adapter/cross_adapter/leave_out "
        "against model.sites() (bottleneck adapters take the 'o' and 'ffn_out' sites)",
    )
    sizes = {}
    for loc in chosen:
        hidden = loc.site.out_features
        try:
            rf = config.reduction_for(loc.layer)
        except KeyError:
            raise ConfigError(
                f"{name}.reduction_factor has no entry for layer {loc.layer} and no 'default': "
                "give one, e.g. {'1': 8, 'default': 16}"
            ) from None
        down = int(hidden // rf)
        check(
            down >= 1,
            f"{name}.reduction_factor={rf} gives a bottleneck of {down} units for layer {loc.layer} "
            f"(hidden size {hidden}); it must be at most {hidden}",
        )
        if config.phm_layer:
            n = config.phm_dim
            check(
                hidden % n == 0 and down % n == 0,
                f"{name}.phm_dim={n} must divide the hidden size ({hidden}) and the bottleneck size "
                f"({down}, from reduction_factor={rf}) of layer {loc.layer}",
            )
        sizes[loc.site.key] = (hidden, down)
    hidden = next(iter(sizes.values()))[0] if sizes else _hidden(sites)
    seed = config.init_weights_seed
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        modules: dict[str, nn.Module] = {}
        for key, (h, down) in sizes.items():
            modules[key] = Bottleneck(h, down, config)
        if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm) and sizes:
            modules[SHARED] = SharedPHM(config, *next(iter(sizes.values())))
        if config.inv_adapter is not None:
            modules[INVERTIBLE] = invertible(config, hidden)
    return {k: m.to(device=device, dtype=dtype) for k, m in modules.items()}


def invertible(config: BnConfig, channels: int) -> nn.Module:
    """The invertible adapter (NICE or GLOW), initialised like AdapterHub (normal(0, 0.02), bias 0)."""
    cls = NICECoupling if config.inv_adapter == "nice" else GLOWCoupling
    block = cls(channels, lambda: Activation(config.non_linearity), config.inv_adapter_reduction_factor)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(mean=0.0, std=0.02)
                m.bias.zero_()
    return block


def _hidden(sites: SiteTable) -> int:
    locs = locations(sites)
    check(bool(locs), "no attention output or FFN output projection found: see model.sites()")
    return locs[0].site.out_features
