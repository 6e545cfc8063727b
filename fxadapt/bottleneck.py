"""Bottleneck adapters: ``x + s · up(act(down(x)))`` at a block's residual connection (AdapterHub's family).

``BnConfig`` has every option of AdapterHub's ``BnConfig``; the presets are its subclasses with
AdapterHub's defaults: ``SeqBnConfig`` (Pfeiffer), ``DoubleSeqBnConfig`` (Houlsby), ``ParBnConfig``
(He et al.'s parallel adapter), ``ScaledParBnConfig``, ``AdapterPlusConfig``; Compacter's
presets are in ``compacter.py`` (PHM layers, ``phm.py``) and the invertible ones in
``invertible.py`` (coupling blocks, ``coupling.py``).

An adapter sits at the residual step after an attention block (``mh_adapter``, the ``o`` site), a
cross-attention block (``cross_adapter``, the second ``o`` site of a decoder layer) or an FFN
(``output_adapter``, the ``ffn_out`` site). ``passes/bottleneck.py`` replaces that step (the add, and
the layer norm after it in post-LN models) by one module call that computes what AdapterHub's
``bottleneck_layer_forward`` computes: ``pre_forward``, the adapter, ``post_forward``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from passes.bottleneck import INVERTIBLE, SHARED, insert_bottleneck
from passes.sites import SiteTable

from .activations import Activation
from .bottleneck_adapterhub import adapterhub_key, adapterhub_name, fill_unsaved_shared
from .bottleneck_config import (
    AdapterPlusConfig,
    BnConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    ScaledParBnConfig,
    SeqBnConfig,
)
from .bottleneck_sites import locations
from .config import check
from .coupling import GLOWCoupling, NICECoupling
from .errors import ConfigError
from .methods import Method, register
from .phm import PHMLayer, SharedPHM


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
        def layer_norm(x: torch.Tensor) -> torch.Tensor:
            shape, weight, bias, eps = norm
            return F.layer_norm(x, shape, weight, bias, eps)

        # pre_forward: the adapter's input x and the residual around it
        if self.parallel:
            x, around = r, r
        else:
            x = h
            around = h if self.residual_before_ln is True else None
            if self.original_ln_before:
                x = h + r
                if self.residual_before_ln == "post_add":
                    around = x
                if norm is not None:
                    x = layer_norm(x)
            if around is None:
                around = x
        # the adapter
        up = self._up(self._down(x, shared), shared)
        up = self._drop_path(up) if not self.parallel else up
        out = self.dropout(up * self.scaling)
        if self.gate is not None:
            gate = torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
            out = out * gate
        if self.parallel:
            if hasattr(self, "adapter_norm_after"):
                out = self.adapter_norm_after(out)
            out = out + h
        else:
            if self.adapter_residual_before_ln:
                out = out + around
            if hasattr(self, "adapter_norm_after"):
                out = self.adapter_norm_after(out)
            if not self.adapter_residual_before_ln:
                out = out + around
        # post_forward
        if self.original_ln_after:
            out = out + r
            if norm is not None:
                out = layer_norm(out)
        return out


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


def register_preset(name: str, config: type[BnConfig], *aliases: str) -> Method:
    method = Method(
        name,
        config,
        build,
        insert_bottleneck,
        None,
        adapterhub_key,
        adapterhub_name=adapterhub_name,
        adapterhub_fit=fill_unsaved_shared,
    )
    return register(method, *aliases)


BOTTLENECK = register_preset("bottleneck", BnConfig)
SEQ_BN = register_preset("seq_bn", SeqBnConfig, "pfeiffer")
DOUBLE_SEQ_BN = register_preset("double_seq_bn", DoubleSeqBnConfig, "houlsby")
PAR_BN = register_preset("par_bn", ParBnConfig, "parallel")
SCALED_PAR_BN = register_preset("scaled_par_bn", ScaledParBnConfig, "scaled_parallel")
ADAPTER_PLUS = register_preset("adapter_plus", AdapterPlusConfig)
