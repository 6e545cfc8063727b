"""VeRA: frozen random projections shared by all layers, scaled by small trained factors (Kopiczko et al., 2024).

``ΔW = s · Λ_b B Λ_d A`` with ``A`` ``[r, in]`` and ``B`` ``[out, r]`` sliced from one shared pair
(``[r, max in]``, ``[max out, r]``, as PEFT slices them), frozen, and per site the trained scalings.
Config names and defaults follow AdapterHub's ``VeraConfig`` (``"vera"``: ``vera_d=0.1``,
``vera_b=0.0``, so a fresh adapter is the identity). ``scalings`` says what the scalings are:

- ``"matrix"`` (AdapterHub 1.3): full matrices ``vera_D`` ``[r, r]`` and ``vera_B`` ``[out, out]``,
  initialised diagonal, with ``s = alpha / r``;
- ``"vector"`` (the paper, PEFT): vectors ``vera_lambda_d`` ``[r]`` and ``vera_lambda_b`` ``[out]``.

The shared projections are drawn with kaiming-uniform from ``init_weights_seed`` when given (the
stream both AdapterHub and PEFT, with ``projection_prng_key``, draw from), else from torch's RNG.
They live in the adapter's ``shared_parameters`` module, saved with it; an AdapterHub file saved from a
model without a head lacks them (AdapterHub's save filter), and they are drawn again from the seed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from passes.sites import Site, SiteTable
from passes.vera import SHARED, insert_vera

from ..config import check
from ..errors import AdapterFileError
from ..formats.keys import site_for
from ..formats.peft import refuse_options
from ..registry import Method, register
from .lora import LoRAConfig, select
from .lora.naming import lora_key, lora_name

SCALINGS = ("matrix", "vector")


@dataclasses.dataclass
class VeraConfig(LoRAConfig):
    """AdapterHub's ``VeraConfig``; ``scalings`` is fxadapt's (AdapterHub's matrices or PEFT's vectors)."""

    foreign_defaults = {"use_dora": False, "dtype": None}
    local_options = {**LoRAConfig.local_options, "scalings": "matrix"}

    r: int = 8
    vera_d: float = 0.1
    vera_b: float = 0.0
    init_weights: str = "vera"
    init_weights_seed: int | None = None
    scalings: str = "matrix"

    def validate(self) -> None:
        super().validate()
        check(self.init_weights == "vera", "VeraConfig.init_weights must be 'vera'")
        check(self.composition_mode == "add", "VeRA needs composition_mode='add' (as in AdapterHub)")
        check(not self.use_gating, "VeRA with use_gating is not supported")
        check(self.scalings in SCALINGS, f"VeraConfig.scalings must be one of {list(SCALINGS)}")
        check(isinstance(self.vera_d, (int, float)), "VeraConfig.vera_d must be a number")
        check(isinstance(self.vera_b, (int, float)), "VeraConfig.vera_b must be a number")


class VeraShared(nn.Module):
    """The frozen random projections, buffers saved with the adapter (``lora_A``, ``lora_B``)."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int | None, dtype: Any, device: Any) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("lora_A", _kaiming((r, max_in), generator).to(dtype=dtype, device=device))
        self.register_buffer("lora_B", _kaiming((max_out, r), generator).to(dtype=dtype, device=device))


def _kaiming(shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    """``kaiming_uniform_`` (gain √2, fan in): AdapterHub's and PEFT's draw, from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Vera(nn.Module):
    """One site's scalings; called as ``module(x, y, A, B)`` with the shared projections."""

    def __init__(self, site: Site, config: VeraConfig, dtype: Any, device: Any) -> None:
        super().__init__()
        r, out = config.r, site.out_features
        kw = dict(dtype=dtype, device=device)
        self.in_features, self.out_features = site.in_features, out
        self.scaling = config.scaling
        self.matrix = config.scalings == "matrix"
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.matrix:
            self.vera_D = nn.Parameter(torch.diag(torch.full((r,), float(config.vera_d), **kw)))
            self.vera_B = nn.Parameter(torch.diag(torch.full((out,), float(config.vera_b), **kw)))
        else:
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(config.vera_d), **kw))
            self.vera_lambda_b = nn.Parameter(torch.full((out,), float(config.vera_b), **kw))

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left [out, r], right [r, in])`` with ``ΔW = s · left @ right``."""
        a, b = a[:, : self.in_features], b[: self.out_features, :]
        if self.matrix:
            return self.vera_B @ b, self.vera_D @ a
        return self.vera_lambda_b[:, None] * b, self.vera_lambda_d[:, None] * a

    def forward(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        left, right = self.factors(a.to(x.dtype), b.to(x.dtype))
        return y + F.linear(F.linear(self.dropout(x), right), left) * self.scaling

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        left, right = self.factors(a, b)
        return left @ right * self.scaling


def build(config: VeraConfig, sites: SiteTable, dtype: torch.dtype, device: Any) -> dict[str, nn.Module]:
    chosen = select(config, sites)
    check(bool(chosen), "VeRA found no site to adapt: check attn_matrices/leave_out against model.sites()")
    modules: dict[str, nn.Module] = {}
    for key, (site, _) in chosen.items():
        check(site.expert is None, f"VeRA cannot adapt the expert parameter {site.weight}")
        check(
            not site.fused or config.fused_qkv == "joint",
            f"VeRA adapts a fused projection's whole output ({key}): use fused_qkv='joint'",
        )
        modules[key] = Vera(site, config, dtype, device)
    max_in = max(s.in_features for s, _ in chosen.values())
    max_out = max(s.out_features for s, _ in chosen.values())
    shared = VeraShared(config.r, max_in, max_out, config.init_weights_seed, dtype, device)
    for module in modules.values():
        module.__dict__["shared"] = shared  # a reference for folding, not a submodule
    modules[SHARED] = shared
    return modules


# ---- AdapterHub's names ---------------------------------------------------------------------------
_SHARED_KEY = re.compile(r"^(?:.*\.)?shared_parameters\.[^.]+\.(?P<param>lora_[AB])$")


def adapterhub_key(key: str, sites: Any, config: Any = None) -> str | None:
    m = _SHARED_KEY.match(key)
    if m is not None:
        return f"{SHARED}.{m['param']}"
    return lora_key(key, sites, config)


def adapterhub_name(key: str, sites: Any, config: Any, name: str) -> str:
    check(
        config.scalings == "matrix",
        "VeRA with scalings='vector' (PEFT's) is not AdapterHub's VeRA, which trains full matrices; save it "
        "with format='peft' or 'fxadapt'",
    )
    if key.startswith(SHARED + "."):
        return f"{SHARED}.{name}.{key[len(SHARED) + 1 :]}"
    return lora_name(key, sites, config, name)


def adapterhub_fit(config: VeraConfig, tensors: dict[str, torch.Tensor], sites: Any) -> VeraConfig:
    """The sites the file adapts; shared projections AdapterHub did not save are drawn again."""
    from .lora import fit_sites

    config = fit_sites(config, tensors, sites)
    if not any(k.startswith(SHARED + ".") for k in tensors):
        shared = build(config, sites, torch.float32, torch.device("cpu"))[SHARED]
        for k, v in shared.state_dict().items():
            tensors[f"{SHARED}.{k}"] = v
        if config.init_weights_seed is None:
            warnings.warn(
                "the AdapterHub VeRA file lacks the shared random projections (AdapterHub saves them only from "
                "a model with a head) and its config has no init_weights_seed to draw them again: they are "
                "drawn afresh, as AdapterHub's load_adapter would do, so outputs differ from the saving model's",
                stacklevel=4,
            )
    return config


# ---- PEFT's names ---------------------------------------------------------------------------------
_PEFT_SITE = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<param>vera_lambda_[bd])(?:\.[^.]+)?$")
_PEFT_SHARED = re.compile(r"^(?:base_model\.)?(?P<param>vera_[AB])(?:\.[^.]+)?$")


def from_peft(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[VeraConfig, dict]:
    refuse_options(raw, {"r", "d_initial", "vera_dropout", "projection_prng_key", "save_projection"}, "VeRA")
    if raw.get("bias") not in (None, "none"):
        raise AdapterFileError(f"PEFT VeRA option bias={raw['bias']!r} trains base biases; fxadapt cannot")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _PEFT_SHARED.match(key)
        if m is not None:
            out[f"{SHARED}.lora_{m['param'][-1]}"] = t
            continue
        m = _PEFT_SITE.match(key)
        if m is None:
            raise AdapterFileError(f"PEFT tensor {key!r} is not a VeRA vector or projection")
        out[f"{site_for(m['path'], sites)}.{m['param']}"] = t
    r = int(raw["r"])
    config = VeraConfig(
        r=r,
        alpha=r,
        vera_d=float(raw.get("d_initial", 0.1)),
        dropout=float(raw.get("vera_dropout") or 0.0),
        fused_qkv="joint",
        target_sites=sorted({k.rsplit(".", 1)[0] for k in out if not k.startswith(SHARED + ".")}),
        init_weights_seed=int(raw.get("projection_prng_key", 0)),
        scalings="vector",
    )
    if not any(k.startswith(SHARED + ".") for k in out):  # PEFT draws them again from its key
        shared = build(config, sites, torch.float32, torch.device("cpu"))[SHARED]
        out.update({f"{SHARED}.{k}": v for k, v in shared.state_dict().items()})
    return config, out


def to_peft(adapter: Any, model: Any) -> tuple[dict, dict]:
    config = adapter.config
    tensors: dict[str, torch.Tensor] = {}
    for key, module in adapter.items():
        if key == SHARED:
            tensors["base_model.vera_A"] = module.lora_A
            tensors["base_model.vera_B"] = module.lora_B
            continue
        check(
            "@" not in key,
            f"site {key!r} is one call of a shared weight (per_call=True): PEFT adapts weights",
        )
        if module.matrix:
            d, b = module.vera_D.detach(), module.vera_B.detach()
            check(
                torch.equal(d, torch.diag(torch.diagonal(d)))
                and torch.equal(b, torch.diag(torch.diagonal(b))),
                f"VeRA at {key} has full (AdapterHub) scaling matrices; PEFT's VeRA has vectors only",
            )
            d, b = torch.diagonal(d), torch.diagonal(b)
        else:
            d, b = module.vera_lambda_d.detach(), module.vera_lambda_b.detach()
        tensors[f"base_model.model.{key}.vera_lambda_d"] = d
        tensors[f"base_model.model.{key}.vera_lambda_b"] = b * module.scaling  # PEFT has no alpha/r
    out = {
        "peft_type": "VERA",
        "r": config.r,
        "target_modules": [k for k in adapter.site_keys if k != SHARED],
        "d_initial": config.vera_d,
        "vera_dropout": config.dropout,
        "projection_prng_key": config.init_weights_seed or 0,
        "save_projection": True,
        "bias": "none",
        "fan_in_fan_out": False,
    }
    return out, tensors


def fold(module: Vera, weight: torch.Tensor, bias: torch.Tensor | None, site: Site) -> None:
    """``W += s · Λ_b B Λ_d A``: exact."""
    delta = module.delta_weight(module.shared.lora_A, module.shared.lora_B).to(weight.dtype)
    weight.add_(delta.t() if site.transposed else delta)


VERA = register(
    Method(
        "vera",
        VeraConfig,
        build,
        insert_vera,
        fold,
        adapterhub_key=adapterhub_key,
        adapterhub_name=adapterhub_name,
        adapterhub_fit=adapterhub_fit,
        peft_type="VERA",
        from_peft=from_peft,
        to_peft=to_peft,
        adapterhub_when=lambda c: (
            c.get("architecture") == "lora"
            and (isinstance(c.get("vera_d"), float) or isinstance(c.get("vera_b"), float))
            and not c.get("use_dora")
        ),
    )
)
