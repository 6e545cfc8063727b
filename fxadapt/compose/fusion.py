"""AdapterFusion (Pfeiffer et al., 2021): ``AdapterFusionConfig``, the fusion layer, and a fusion's layers.

At every residual site where all fused adapters live, a fusion layer attends over the adapters'
up-projections: ``p = softmax_i((W_q q + b_q) · (W_k u_i + b_k) / T)`` (no ``1/sqrt(d)``), output
``Σ_i p_i W_v u_i + residual``, as AdapterHub's ``BertFusion`` computes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapter import slot
from ..errors import ConfigError


@dataclasses.dataclass
class AdapterFusionConfig:
    """AdapterHub's ``AdapterFusionConfig`` fields; ``"dynamic"`` and ``"static"`` are its presets."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool | str = True
    dropout_prob: float | None = None

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "dynamic": {},
        "static": {"value": False, "regularization": False, "value_initialized": False},
    }

    def __post_init__(self) -> None:
        for name in ("key", "query", "value", "query_before_ln", "regularization", "residual_before"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"AdapterFusionConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        for name in ("temperature", "value_before_softmax"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"AdapterFusionConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        p = self.dropout_prob
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
            raise ConfigError(f"AdapterFusionConfig.dropout_prob must be None or in [0, 1), got {p!r}")

    @classmethod
    def load(
        cls, config: str | dict[str, Any] | AdapterFusionConfig | None = None, **overrides: Any
    ) -> AdapterFusionConfig:
        """A config from a preset name (``"dynamic"``, the default, or ``"static"``), a dict or a config."""
        if config is None:
            config = "dynamic"
        if isinstance(config, AdapterFusionConfig):
            data = dataclasses.asdict(config)
        elif isinstance(config, str):
            if config not in cls.presets:
                raise ConfigError(f"unknown AdapterFusion config {config!r}; valid: {sorted(cls.presets)}")
            data = dict(cls.presets[config])
        elif isinstance(config, dict):
            data = dict(config)
        else:
            raise ConfigError(f"an AdapterFusion config must be a name, a dict or a config, got {config!r}")
        data.update(overrides)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"AdapterFusionConfig has no option(s) {unknown}; valid: {sorted(fields)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Fusion(nn.Module):
    """One fusion layer: attention over the fused adapters' up-projections at one site."""

    def __init__(self, config: AdapterFusionConfig, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual_before = config.residual_before
        self.value_before_softmax = config.value_before_softmax
        self.query = nn.Linear(hidden, hidden) if config.query else None
        self.key = nn.Linear(hidden, hidden) if config.key else None
        self.value = nn.Linear(hidden, hidden, bias=False) if config.value else None
        for layer in (self.query, self.key, self.value):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if self.value is not None and config.value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout = nn.Dropout(dropout)
        self.anneal = bool(config.temperature)
        start = 50.0 if config.temperature else 1.0
        self.register_buffer("T", torch.tensor(start), persistent=False)
        self.reduction = start / 1000.0

    def forward(self, query: torch.Tensor, ups: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``query`` ``[B, S, H]``, ``ups`` ``[B, S, N, H]``, ``residual`` ``[B, S, H]`` -> ``[B, S, H]``."""
        value = ups + residual.unsqueeze(2) if self.residual_before else ups
        q = self.query(query) if self.query is not None else query
        k = self.key(ups) if self.key is not None else ups
        v = self.value(value) if self.value is not None and self.value_before_softmax else value
        scores = torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2)
        probs = torch.softmax(self.dropout(scores) / self.T, dim=-1)
        if self.anneal:
            with torch.no_grad():
                self.T.copy_(torch.clamp(self.T - self.reduction, min=1.0))
        context = torch.matmul(probs.unsqueeze(2), v).squeeze(2)
        if self.value is not None and not self.value_before_softmax:
            context = self.value(context)
        return context if self.residual_before else context + residual

    def regularization(self) -> torch.Tensor:
        """AdapterHub's ``0.01·‖I − W_v‖²`` for this layer (zero without a value matrix)."""
        if self.value is None:
            return self.T.new_zeros(())
        eye = torch.eye(
            self.value.weight.shape[0], dtype=self.value.weight.dtype, device=self.value.weight.device
        )
        return 0.01 * (eye - self.value.weight).pow(2).sum()


class FusionLayers(nn.Module):
    """A named fusion (``"a,b,c"``): its config, the adapters it fuses, one ``Fusion`` per site."""

    def __init__(
        self, name: str, adapter_names: list[str], config: AdapterFusionConfig, layers: dict[str, Fusion]
    ):
        super().__init__()
        self.name = name
        self.adapter_names = list(adapter_names)
        self.config = config
        self.site_keys = list(layers)
        self.layers = nn.ModuleDict({slot(k): m for k, m in layers.items()})

    def target(self, site_key: str, root: str) -> str | None:
        if site_key not in self.site_keys:
            return None
        return f"{root}.layers.{slot(site_key)}"

    def items(self) -> list[tuple[str, Fusion]]:
        return [(k, self.layers[slot(k)]) for k in self.site_keys]

    def regularization(self) -> torch.Tensor:
        terms = [
            m.regularization()
            for _, m in self.items()
            if m.value is not None and m.value.weight.requires_grad
        ]
        if not terms:
            ref = next(self.parameters(), None)
            return torch.zeros((), device=ref.device if ref is not None else None)
        return torch.stack(terms).sum()


def fusion_key(name: str) -> str:
    """The fusion's key among the model's modules: its AdapterHub name (``"a,b,c"``)."""
    if not isinstance(name, str) or not name or "." in name or not name.isprintable():
        raise ConfigError(f"a fusion name must be a non-empty string without dots, got {name!r}")
    return name


def fusion_dropout(config: AdapterFusionConfig, model_config: Any) -> float:
    """AdapterHub's choice: the config's ``dropout_prob``, else the model's attention dropout, else 0."""
    if config.dropout_prob is not None:
        return float(config.dropout_prob)
    p = getattr(model_config, "attention_probs_dropout_prob", None)
    return float(p) if isinstance(p, (int, float)) and math.isfinite(p) else 0.0
