"""LoRA's and (IA)^3's PEFT files, both ways.

PEFT names a LoRA tensor ``base_model.model.<module>.lora_<A|B>.weight``; a 3-D expert parameter
targeted with ``target_parameters`` gets one ``lora_A`` ``[r·experts, in]`` and ``lora_B``
``[out, r·experts]`` on its module (wrappers nest, ``<module>.base_layer.lora_A`` for the parameter
targeted first), expert ``e`` owning rows ``e·r..(e+1)·r`` of A and columns ``j·experts + e`` of B.
(IA)^3 is ``<module>.ia3_l``. fxadapt names tensors ``<site key>.<param>``.

PEFT gives a fused projection one block over its whole output (``fused_qkv="joint"``); an fxadapt
``"split"`` block per role is written as one block of rank ``roles·r`` whose B is block-diagonal,
which computes the same (``rank_pattern``/``alpha_pattern`` carry the rank and alpha).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch

from ...config import check
from ...errors import AdapterFileError
from ...formats.keys import site_for
from ...formats.peft import refuse_options
from .config import LoRAConfig

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
_MAGNITUDE = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"
)
_IA3_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.ia3_l(?:\.[^.]+)?$")
_LORA_OPTIONS = {"r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern"}
_LORA_OPTIONS |= {"target_parameters", "use_dora", "bias", "lora_bias"}


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def read_lora(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[dict, dict, dict]:
    """PEFT LoRA tensors onto sites: ({fxadapt name: tensor}, {site: rank}, {site: effective alpha}).

    The effective alpha makes ``alpha / rank`` PEFT's scaling (``use_rslora``: ``alpha / sqrt(rank)``).
    """
    refuse_options(raw, _LORA_OPTIONS, "LoRA")
    for option in ("bias", "lora_bias"):
        if raw.get(option) not in (None, False, "none"):
            raise AdapterFileError(
                f"PEFT LoRA option {option}={raw[option]!r} trains base biases, which fxadapt cannot express"
            )
    grouped: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            if _MAGNITUDE.match(key):
                continue
            raise AdapterFileError(f"PEFT tensor {key!r} is not a LoRA A/B weight")
        grouped.setdefault((m["path"], m["nest"].count(".base_layer")), {})[m["ab"]] = t
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    r0, alpha0 = _peft_numbers(raw)
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    experts = _expert_params(raw, sites)
    for (path, depth), ab in grouped.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"PEFT LoRA module {path!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterFileError(
                f"PEFT LoRA module {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                "an [r, in] and an [out, r] matrix"
            )
        alpha = float(_pattern_value(alpha_pattern, path, alpha0))
        if path in experts or any(p.startswith(path + ".") for p in experts):
            for key, (ea, eb) in _split_experts(path, depth, a, b, raw, sites).items():
                out[f"{key}.lora_A"], out[f"{key}.lora_B"] = ea, eb
                ranks[key], alphas[key] = ea.shape[0], _effective(alpha, ea.shape[0], raw)
            continue
        key = site_for(path, sites)
        rank = a.shape[0]
        expected = int(_pattern_value(rank_pattern, path, r0))
        if rank != expected:
            raise AdapterFileError(f"PEFT LoRA module {path!r} has rank {rank}, its config says {expected}")
        out[f"{key}.lora_A"], out[f"{key}.lora_B"] = a, b
        ranks[key], alphas[key] = rank, _effective(alpha, rank, raw)
    return out, ranks, alphas


def _peft_numbers(raw: dict[str, Any]) -> tuple[int, float]:
    """``r`` and ``lora_alpha`` checked (a missing one takes PEFT's ``LoraConfig`` default, as PEFT does)."""
    r, alpha, rslora = raw.get("r", 8), raw.get("lora_alpha", 8), raw.get("use_rslora", False)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFileError(f"PEFT option r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterFileError(f"PEFT option lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(rslora, bool):
        raise AdapterFileError(f"PEFT option use_rslora must be true or false, got {rslora!r}")
    return r, float(alpha)


def _effective(alpha: float, rank: int, raw: dict[str, Any]) -> float:
    return alpha * math.sqrt(rank) if raw.get("use_rslora") else alpha


def _expert_params(raw: dict[str, Any], sites: Any) -> dict[str, list[str]]:
    """``{module path: [its target_parameters, in PEFT's order]}`` for 3-D expert parameters."""
    out: dict[str, list[str]] = {}
    for name in raw.get("target_parameters") or []:
        module, _, param = name.rpartition(".")
        out.setdefault(module, []).append(param)
    return out


def _split_experts(
    path: str, depth: int, a: torch.Tensor, b: torch.Tensor, raw: dict[str, Any], sites: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One PEFT expert-parameter LoRA as per-expert ``(A_e, B_e)``, keyed by the expert sites."""
    params = _expert_params(raw, sites)[path]
    by_param: dict[str, list] = {}
    for s in sites:
        if s.expert is not None:
            by_param.setdefault(s.weight.removeprefix("base."), []).append(s)
    candidates = [p for p in params if f"{path}.{p}" in by_param]
    fits = [
        p
        for p in candidates
        if (by_param[f"{path}.{p}"][0].in_features, by_param[f"{path}.{p}"][0].out_features)
        == (a.shape[1], b.shape[0])
    ]
    if len(fits) != 1:  # the parameter targeted first is the innermost wrapper
        index = len(params) - 1 - depth
        fits = [params[index]] if 0 <= index < len(params) else []
    if not fits or f"{path}.{fits[0]}" not in by_param:
        raise AdapterFileError(f"PEFT LoRA on {path!r} matches no expert parameter of this model")
    experts = sorted(by_param[f"{path}.{fits[0]}"], key=lambda s: s.expert)
    n = len(experts)
    if a.shape[0] % n or b.shape[1] != a.shape[0]:
        raise AdapterFileError(f"PEFT LoRA on {path}.{fits[0]}: shapes {tuple(a.shape)}, {tuple(b.shape)}")
    r = a.shape[0] // n
    a3 = a.reshape(n, r, a.shape[1])
    b3 = b.reshape(b.shape[0], r, n)
    return {s.key: (a3[s.expert].clone(), b3[:, :, s.expert].clone()) for s in experts}


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v != default}


def from_peft(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[Any, dict]:
    """A PEFT LoRA folder as an fxadapt LoRA over the sites it names."""
    options, out = lora_options(raw, tensors, sites)
    return LoRAConfig(**options), out


def lora_options(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[dict, dict]:
    """LoRAConfig options and fxadapt tensors of a PEFT LoRA folder.

    ``rank_pattern``/``alpha_pattern`` and ``use_rslora`` become per-site ranks and alphas;
    ``layers_to_transform`` needs nothing (the file holds the layers it chose).
    """
    out, ranks, alphas = read_lora(raw, tensors, sites)
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(raw["r"])
    alpha = Counter(a for k, a in alphas.items() if ranks[k] == r).most_common(1)
    alpha = alpha[0][0] if alpha else float(raw["lora_alpha"])
    options = dict(
        r=r,
        alpha=alpha,
        dropout=float(raw.get("lora_dropout") or 0.0),
        fused_qkv="joint",
        target_sites=sorted(ranks),
        rank_pattern=_patterns(ranks, r),
        alpha_pattern=_patterns({k: a for k, a in alphas.items()}, alpha),
    )
    return options, out


def lora_to_peft(adapter: Any, model: Any, peft_type: str = "LORA") -> tuple[dict, dict]:
    """fxadapt LoRA -> PEFT's config and tensors (a split fused block as one block-diagonal block)."""
    config = adapter.config
    if config.composition_mode == "scale":
        return scale_to_peft(adapter, model)
    check(
        not config.use_gating,
        "a gated LoRA (use_gating=True) has no PEFT equivalent; save with format='fxadapt'",
    )
    sites = model.sites().by_key()
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    experts: dict[str, dict[int, tuple]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, module in adapter.items():
        site = sites[key]
        check(
            "@" not in key,
            f"site {key!r} is one call of a shared weight (per_call=True): PEFT adapts weights",
        )
        a, b = module.lora_A.detach(), module.full_B().detach()
        rank = a.shape[0]
        if site.expert is not None:
            experts.setdefault(site.weight.removeprefix("base."), {})[site.expert] = (a, b, module.scaling)
            continue
        modules.append(key)
        tensors[f"base_model.model.{key}.lora_A.weight"] = a
        tensors[f"base_model.model.{key}.lora_B.weight"] = b
        ranks[key], alphas[key] = rank, module.scaling * rank
    params = sorted(experts)
    for depth_index, param in enumerate(params):
        module_path, _, _ = param.rpartition(".")
        later = [p for p in params[depth_index + 1 :] if p.rpartition(".")[0] == module_path]
        nest = ".base_layer" * len(later)
        stack = experts[param]
        n = max(stack) + 1
        check(
            len(stack) == n,
            f"PEFT's target_parameters adapt every expert of {param}; this adapter has {len(stack)}",
        )
        a = torch.cat([stack[e][0] for e in range(n)])
        rank = stack[0][0].shape[0]
        b = torch.stack([stack[e][1] for e in range(n)], dim=-1).reshape(stack[0][1].shape[0], rank * n)
        tensors[f"base_model.model.{module_path}{nest}.lora_A.weight"] = a
        tensors[f"base_model.model.{module_path}{nest}.lora_B.weight"] = b
        ranks[param], alphas[param] = rank, stack[0][2] * rank
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for k, a in alphas.items() if ranks[k] == r).most_common(1)[0][0]
    transposed = [sites[k].transposed for k in modules]
    out = {
        "peft_type": peft_type,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": modules or None,
        "target_parameters": params or None,
        "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != alpha},
        "bias": "none",
        "fan_in_fan_out": bool(transposed) and all(transposed),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return out, tensors


def scale_to_peft(adapter: Any, model: Any) -> tuple[dict, dict]:
    """fxadapt (IA)^3 -> PEFT's, every site an output scale (PEFT's non-feedforward (IA)^3)."""
    check(not adapter.config.use_gating, "a gated (IA)^3 has no PEFT equivalent; save with format='fxadapt'")
    sites = model.sites().by_key()
    tensors = {}
    for key, module in adapter.items():
        check(sites[key].expert is None, "PEFT's (IA)^3 cannot scale expert parameters")
        check(
            "@" not in key,
            f"site {key!r} is one call of a shared weight (per_call=True): PEFT adapts weights",
        )
        tensors[f"base_model.model.{key}.ia3_l"] = module.vector().detach().reshape(-1, 1)
    transposed = [sites[k].transposed for k in adapter.site_keys]
    config = {
        "peft_type": "IA3",
        "target_modules": list(adapter.site_keys),
        "feedforward_modules": [],
        "fan_in_fan_out": bool(transposed) and all(transposed),
        "init_ia3_weights": True,
    }
    return config, tensors
