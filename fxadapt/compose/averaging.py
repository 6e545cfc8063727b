"""Parameter averaging: a new adapter whose parameters combine those of several (AdapterHub's ``average_adapter``).

AdapterHub's strategies: ``linear`` (every parameter ``Σ λ_i Φ_i``; for LoRA, A and B separately),
``lora_linear_only_negate_b`` (``A = Σ |λ_i| A_i``, ``B = Σ λ_i B_i``) and ``lora_delta_w_svd``
(``ΔW = Σ λ_i B_i A_i``, truncated SVD at ``svd_rank``; alpha kept, so the scaling becomes
``alpha/svd_rank``). Beyond AdapterHub, PEFT's merge operators on every parameter: ``ties``
(trim to ``density``, elect a sign, disjoint mean), ``dare_linear`` and ``dare_ties`` (random drop
with rescale ``1/density`` first; pass ``seed`` for a reproducible drop).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..adapter import Adapter, slot
from ..errors import ConfigError

STRATEGIES = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd", "ties", "dare_linear", "dare_ties")
_LORA_ONLY = ("lora_linear_only_negate_b", "lora_delta_w_svd")
_IGNORED = ("dropout", "init_weights")  # options that may differ between the averaged adapters


def normalized(adapter_list: Any, weights: Any, normalize_weights: bool) -> tuple[list[str], list[float]]:
    """The names and their λ: ``1/N`` by default, else the weights, normalised to sum 1 unless told not to."""
    if isinstance(adapter_list, dict):
        names, weights = list(adapter_list), list(adapter_list.values())
    else:
        names = [adapter_list] if isinstance(adapter_list, str) else list(adapter_list)
    if not names:
        raise ConfigError("average_adapter needs at least one adapter in adapter_list")
    if weights is None:
        return names, [1.0 / len(names)] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ConfigError(f"average_adapter got {len(names)} adapters but {len(weights)} weights")
    if normalize_weights:
        total = sum(weights)
        if total == 0:
            raise ConfigError(
                f"weights {weights} sum to 0 and cannot be normalised; pass normalize_weights=False"
            )
        weights = [w / total for w in weights]
    return names, weights


def check(adapters: list[Adapter], strategy: str, svd_rank: int | None, density: float | None) -> None:
    """Refuse what cannot be averaged, before anything is built (AdapterHub's pre-checks and more)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown combine_strategy {strategy!r}; valid: {list(STRATEGIES)}")
    first = adapters[0]
    ref = {k: v for k, v in first.config.to_dict().items() if k not in _IGNORED}
    for a in adapters[1:]:
        other = {k: v for k, v in a.config.to_dict().items() if k not in _IGNORED}
        if type(a.config) is not type(first.config) or other != ref:
            raise ConfigError(
                f"adapters {first.name!r} and {a.name!r} have different configs; only adapters of one config "
                "(up to dropout and init_weights) can be averaged"
            )
    arch = first.config.architecture
    if arch == "union" and strategy != "linear":
        raise ConfigError(
            f"a ConfigUnion adapter can only be averaged with combine_strategy='linear', not {strategy!r}"
        )
    if strategy in _LORA_ONLY and arch != "lora":
        raise ConfigError(
            f"combine_strategy={strategy!r} is for LoRA and (IA)^3 adapters, not {first.method.name}"
        )
    if strategy == "lora_delta_w_svd":
        if getattr(first.config, "composition_mode", "add") != "add":
            raise ConfigError("lora_delta_w_svd needs LoRA matrices A and B; (IA)^3 has a vector only")
        if not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1:
            raise ConfigError(
                f"combine_strategy='lora_delta_w_svd' needs svd_rank (an int >= 1), got {svd_rank!r}"
            )
    if strategy in ("ties", "dare_linear", "dare_ties"):
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
            raise ConfigError(f"combine_strategy={strategy!r} needs density in (0, 1], got {density!r}")


def average(
    adapters: list[Adapter],
    name: str,
    weights: list[float],
    strategy: str,
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> Adapter:
    """A new adapter ``name`` from ``adapters`` (checked with ``check``)."""
    first = adapters[0]
    config = first.config
    if strategy == "lora_delta_w_svd" and svd_rank is not None:
        config = config.replace(r=svd_rank)
    modules = {key: copy.deepcopy(module) for key, module in first.items()}
    new = Adapter(name, config, modules)
    if strategy == "lora_delta_w_svd":
        _svd(new, adapters, weights, svd_rank)
        return new
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    states = [a.state_dict() for a in adapters]
    merged = {}
    for key in states[0]:
        tensors = [s[key] for s in states]
        if not tensors[0].is_floating_point():
            merged[key] = tensors[0]
            continue
        if strategy == "lora_linear_only_negate_b":
            merged[key] = _negate_b(key, tensors, weights)
        elif strategy == "linear":
            merged[key] = sum(w * t for w, t in zip(weights, tensors))
        else:
            merged[key] = _peft_merge(strategy, tensors, weights, density, majority_sign_method, generator)
    new.load_state_dict(merged)
    return new


def _negate_b(key: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    param = key.rsplit(".", 1)[-1]
    if param == "lora_A":
        return sum(abs(w) * t for w, t in zip(weights, tensors))
    if param == "lora_B":
        return sum(w * t for w, t in zip(weights, tensors))
    raise ConfigError(f"lora_linear_only_negate_b averages lora_A and lora_B only; {key!r} is neither")


def _svd(new: Adapter, adapters: list[Adapter], weights: list[float], rank: int) -> None:
    """``ΔW = Σ λ_i B_i A_i`` per site, truncated to ``rank``: ``A = V_k``, ``B = U_k diag(S_k)``."""
    with torch.no_grad():
        for key, module in new.items():
            delta = sum(
                w * (a.layers[slot(key)].full_B() @ a.layers[slot(key)].lora_A)
                for w, a in zip(weights, adapters)
            )
            u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
            k = min(rank, s.shape[0])
            a_new = vh[:k]
            b_new = u[:, :k] * s[:k]
            if k < rank:
                a_new = torch.cat([a_new, a_new.new_zeros(rank - k, a_new.shape[1])])
                b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], rank - k)], dim=1)
            if getattr(module, "sectioned", False):
                raise ConfigError(
                    f"lora_delta_w_svd cannot rebuild the per-section blocks of fused site {key!r}; "
                    "average with 'linear', or use fused_qkv='joint'"
                )
            module.lora_A = torch.nn.Parameter(a_new.to(module.lora_A.dtype))
            module.lora_B = torch.nn.Parameter(b_new.to(module.lora_B.dtype))
            module.scaling = new.config.scaling  # alpha kept with the new rank, as in AdapterHub


def _peft_merge(
    strategy: str,
    tensors: list[torch.Tensor],
    weights: list[float],
    density: float,
    majority_sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """PEFT's merge operators (``merge_utils``) on one parameter's task tensors."""
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if strategy in ("dare_linear", "dare_ties"):
        keep = torch.bernoulli(torch.full_like(stacked, density), generator=generator)
        stacked = stacked * keep / density
        if strategy == "dare_linear":
            return (stacked * w).sum(dim=0)
    else:
        stacked = _trim(stacked, density)
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    signs = stacked.sign()
    sign_sum = stacked.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(sign_sum >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = signs == elected
    weighted = stacked * w
    count = agree.sum(dim=0).clamp(min=1)
    return (weighted * agree).sum(dim=0) / count


def _trim(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest magnitudes of each task tensor (TIES's trim)."""
    flat = stacked.reshape(stacked.shape[0], -1)
    k = int(density * flat.shape[1])
    if k >= flat.shape[1]:
        return stacked
    out = torch.zeros_like(flat)
    if k > 0:
        top = flat.abs().topk(k, dim=1).indices
        out.scatter_(1, top, flat.gather(1, top))
    return out.reshape(stacked.shape)
