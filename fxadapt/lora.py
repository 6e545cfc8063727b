"""LoRA: a low-rank update ``y + (alpha/r) · B A x`` beside a projection (Hu et al., 2021).

Config names and defaults follow AdapterHub's ``LoRAConfig``. A fused projection such as GPT-2's
``c_attn`` gets one rank-``r`` block per chosen matrix (AdapterHub's layout, ``fused_qkv="split"``) or
one block over the whole output (PEFT's layout, ``fused_qkv="joint"``). With
``composition_mode="scale"`` the update is a learned rescaling ``y ⊙ (alpha/r) · b`` instead: that
is (IA)^3, whose preset lives in ``ia3.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from passes.lora import insert_lora
from passes.sites import Site, SiteTable

from .adapterhub_format import lora_key, lora_name
from .config import AdapterConfig, check
from .methods import Method, register

ATTN_MATRICES = ("q", "k", "v", "o")
INITS = ("lora", "bert", "ia3")
MODES = ("add", "scale")


@dataclasses.dataclass
class LoRAConfig(AdapterConfig):
    """LoRA on the attention matrices (and optionally the FFN), AdapterHub's defaults."""

    architecture = "lora"
    foreign_defaults = {
        "use_dora": False,
        "vera_d": None,
        "vera_b": None,
        "dtype": None,
        "init_weights_seed": None,
    }
    # AdapterHub gives a fused projection one block per matrix (fused_qkv="split") and picks sites
    # only by selfattn_lora/attn_matrices/intermediate_lora/output_lora/leave_out
    local_options = {"fused_qkv": "split", "target_sites": None, "adapterhub_sites": False}

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list[int] = dataclasses.field(default_factory=list)
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    attn_matrices: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    composition_mode: str = "add"
    init_weights: str = "lora"
    use_gating: bool = False
    fused_qkv: str = "split"
    target_sites: list[str] | None = None
    # target_sites were read from an AdapterHub file, whose model code chose them from the role options
    adapterhub_sites: bool = False

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r >= 1, f"LoRAConfig.r must be an int >= 1, got {self.r!r}")
        check(self.alpha > 0, f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        check(0 <= self.dropout < 1, f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        bad = [m for m in self.attn_matrices if m not in ATTN_MATRICES]
        check(not bad, f"LoRAConfig.attn_matrices has {bad}; valid: {list(ATTN_MATRICES)}")
        check(
            self.composition_mode in MODES,
            f"LoRAConfig.composition_mode {self.composition_mode!r} is not valid; valid: {list(MODES)}",
        )
        check(
            self.composition_mode == "add" or self.r == 1,
            f"composition_mode='scale' learns one vector per projection, so r must be 1, got {self.r}",
        )
        check(self.init_weights in INITS, f"LoRAConfig.init_weights must be one of {list(INITS)}")
        check(self.fused_qkv in ("split", "joint"), "LoRAConfig.fused_qkv must be 'split' or 'joint'")
        check(all(isinstance(i, int) for i in self.leave_out), "LoRAConfig.leave_out must list layer ints")
        check(
            not self.adapterhub_sites or self.target_sites is not None,
            "LoRAConfig.adapterhub_sites=True describes target_sites read from an AdapterHub file; set both",
        )

    def to_adapterhub_dict(self) -> dict[str, Any]:
        if self.adapterhub_sites:  # AdapterHub picks these very sites again from the role options
            return self.replace(target_sites=None, adapterhub_sites=False).to_adapterhub_dict()
        return super().to_adapterhub_dict()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRA(nn.Module):
    """The low-rank update for one projection; ``sections`` are the output columns of each block."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        sections: tuple[tuple[int, int], ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        r = config.r
        sections = sections or ((0, out_features),)
        self.out_features = out_features
        self.scaling = config.scaling
        self.grouped = len(sections) > 1 or sections[0] != (0, out_features)
        rows = sum(b - a for a, b in sections)
        kw = dict(dtype=dtype, device=device)
        self.lora_A = nn.Parameter(torch.empty(r * len(sections), in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(rows, r, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.grouped:
            out_idx = torch.cat([torch.arange(a, b).repeat_interleave(r) for a, b in sections])
            rank_idx = torch.cat(
                [torch.arange(i * r, (i + 1) * r).repeat(b - a) for i, (a, b) in enumerate(sections)]
            )
            self.register_buffer("out_idx", out_idx.to(device), persistent=False)
            self.register_buffer("rank_idx", rank_idx.to(device), persistent=False)
        self.reset_parameters(config.init_weights)
        self.gate = _gate(in_features, sections, self, config, kw) if config.use_gating else None

    def reset_parameters(self, init: str = "lora") -> None:
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            elif init == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                nn.init.ones_(self.lora_A)
                nn.init.ones_(self.lora_B)

    def full_B(self) -> torch.Tensor:
        """B as one ``[out, blocks·r]`` matrix: block-diagonal over the sections of a fused output."""
        if not self.grouped:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, self.lora_A.shape[0])
        return full.index_put((self.out_idx, self.rank_idx), self.lora_B.reshape(-1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.full_B())
        if self.gate is None:
            return y + delta * self.scaling
        return y + _rowwise(delta, _gate_values(self, x if src is None else src))

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` as an ``[out, in]`` matrix, for merging."""
        return (self.full_B() @ self.lora_A) * self.scaling


class LoRAScale(nn.Module):
    """A learned per-output-column scale ``y ⊙ (alpha/r) · b``; columns outside ``sections`` keep 1."""

    def __init__(
        self,
        out_features: int,
        config: LoRAConfig,
        sections: tuple[tuple[int, int], ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        sections = sections or ((0, out_features),)
        self.out_features = out_features
        self.scaling = config.scaling
        self.grouped = len(sections) > 1 or sections[0] != (0, out_features)
        rows = sum(b - a for a, b in sections)
        self.lora_B = nn.Parameter(torch.empty(rows, 1, dtype=dtype, device=device))
        if self.grouped:
            idx = torch.cat([torch.arange(a, b) for a, b in sections])
            self.register_buffer("out_idx", idx.to(device), persistent=False)
        with torch.no_grad():
            if config.init_weights == "ia3":
                nn.init.ones_(self.lora_B)
            elif config.init_weights == "bert":
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                nn.init.zeros_(self.lora_B)
        self.gate = None
        if config.use_gating:
            check(in_features is not None, "a gated (IA)^3 vector needs the projection's in_features")
            self.gate = _gate(in_features, sections, self, config, dict(dtype=dtype, device=device))

    def vector(self, scaled: bool = True) -> torch.Tensor:
        """The ``[out]`` scale applied to the projection's output."""
        scale = self.lora_B.reshape(-1) * (self.scaling if scaled else 1.0)
        if not self.grouped:
            return scale
        return scale.new_ones(self.out_features).index_put((self.out_idx,), scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        if self.gate is None:
            return y * self.vector()
        return _rowwise(y * self.vector(scaled=False), _gate_values(self, x if src is None else src))


def _gate(
    in_features: int, sections: tuple[tuple[int, int], ...], owner: nn.Module, config: LoRAConfig, kw: dict
) -> nn.Linear:
    """UniPELT's gate (AdapterHub's ``use_gating``): one logit per adapted block, from the layer input.

    A gated module's update is multiplied by ``mean_seq(sigmoid(gate(x)))`` instead of ``alpha/r``.
    ``head_idx`` maps each output column to its block's gate; columns outside every block read a
    constant 1 (index ``heads``).
    """
    heads = len(sections) if owner.grouped else 1
    gate = nn.Linear(in_features, heads, **kw)
    with torch.no_grad():
        nn.init.normal_(gate.weight, std=0.02)
    if owner.grouped:
        idx = torch.full((owner.out_features,), heads, dtype=torch.long)
        for i, (a, b) in enumerate(sections):
            idx[a:b] = i
        owner.register_buffer("head_idx", idx.to(kw.get("device")), persistent=False)
    return gate


def _gate_values(owner: nn.Module, src: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, out or 1]`` gate values from the layer input ``src`` (batch, seq, features)."""
    src = src if src.dim() >= 3 else src.unsqueeze(0)
    g = torch.sigmoid(owner.gate(src)).mean(dim=1)
    if owner.grouped:
        g = torch.cat([g, g.new_ones(g.shape[0], 1)], dim=-1).index_select(-1, owner.head_idx)
    return g.unsqueeze(1)


def _rowwise(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t * g`` per batch row; ``t`` may be (batch, seq, out) or flattened to (batch·seq, out)."""
    if t.dim() == g.dim():
        return t * g
    return (t.reshape(g.shape[0], -1, t.shape[-1]) * g).reshape(t.shape)


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
            sections = tuple(site.columns(r) for r in roles)
        if config.composition_mode == "scale":
            modules[key] = LoRAScale(site.out_features, config, sections, dtype, device, site.in_features)
        else:
            modules[key] = LoRA(site.in_features, site.out_features, config, sections, dtype, device)
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
    )
)
