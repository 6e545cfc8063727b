"""``AdapterModelInterface``: AdapterHub's plugin interface, accepted as it is, pinning sites by module path.

AdapterHub needs an interface to support a model it has no code for; fxadapt finds sites from the
graph and does not. An interface written for AdapterHub still works unchanged: given to
``AdaptedModel(model, interface=...)``, it overrides automatic detection, so that the projections it
names take their roles (and their layer index from ``model_layers``), and every other projection
takes none. This is the way out when a model's structure or names mislead the detection.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from passes.sites import SiteTable

from .config import AdapterConfig
from .errors import ConfigError

# AdapterHub's method types (``AdapterMethod``), the values ``adapter_methods`` may hold
ADAPTER_METHODS = ("bottleneck", "prefix_tuning", "lora", "prompt_tuning", "reft", "invertible")


@dataclasses.dataclass
class AdapterModelInterface:
    """AdapterHub's ``AdapterModelInterface``: the same fields, names and checks.

    Paths are module names: ``model_embeddings`` and ``model_layers`` relative to the base model
    (``base_model``, else the model's ``base_model_prefix`` submodule, else the model itself);
    ``layer_*`` relative to one layer; ``attn_*`` relative to the attention module of the layer.
    Give either ``attn_q_proj``, ``attn_k_proj`` and ``attn_v_proj`` or one fused ``attn_qkv_proj``.
    """

    adapter_methods: list[str]
    model_embeddings: str
    model_layers: str
    layer_self_attn: str
    layer_cross_attn: str | None
    attn_o_proj: str | None
    layer_intermediate_proj: str
    layer_output_proj: str
    attn_k_proj: str | None = None
    attn_q_proj: str | None = None
    attn_v_proj: str | None = None
    attn_qkv_proj: str | None = None
    layer_pre_self_attn: str | None = None
    layer_pre_cross_attn: str | None = None
    layer_pre_ffn: str | None = None
    layer_ln_1: str | None = None
    layer_ln_2: str | None = None
    base_model: str | None = None

    def __post_init__(self) -> None:
        separate = None not in (self.attn_k_proj, self.attn_q_proj, self.attn_v_proj)
        fused = self.attn_qkv_proj is not None
        if not separate and not fused:
            raise ConfigError(
                "AdapterModelInterface: give either attn_q_proj, attn_k_proj and attn_v_proj, or the "
                "fused attn_qkv_proj"
            )
        if separate and fused:
            raise ConfigError(
                "AdapterModelInterface: give attn_q_proj/attn_k_proj/attn_v_proj or attn_qkv_proj, not both"
            )
        unknown = [m for m in self.adapter_methods if m not in ADAPTER_METHODS]
        if unknown:
            raise ConfigError(
                f"AdapterModelInterface.adapter_methods has {unknown}; valid: {list(ADAPTER_METHODS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_method(self, config: AdapterConfig) -> None:
        """Refuse a method the interface does not list, as AdapterHub does."""
        missing = [m for m in method_types(config) if m not in self.adapter_methods]
        if missing:
            raise ConfigError(
                f"the model's AdapterModelInterface lists adapter_methods={self.adapter_methods}, which "
                f"does not include {missing}; add {missing} to adapter_methods to use this adapter "
                "(fxadapt supports every method on any captured model)"
            )

    def base_path(self, model: nn.Module) -> str:
        """The module path of the base model that holds the layers (``""`` for the model itself)."""
        if self.base_model is not None:
            return self.base_model
        prefix = getattr(model, "base_model_prefix", "") or ""
        inner = getattr(model, prefix, None) if prefix else None
        return prefix if isinstance(inner, nn.Module) and inner is not model else ""

    def check_model(self, model: nn.Module) -> None:
        """Refuse an interface whose layer list or embeddings the model does not have."""
        base = self.base_path(model)
        _require_module(model, _join(base, self.model_layers), "model_layers")
        _require_module(model, _join(base, self.model_embeddings), "model_embeddings")

    def pin(self, sites: SiteTable, model: nn.Module) -> SiteTable:
        """The site table with roles and layers from the interface; other projections get no role."""
        self.check_model(model)
        layers = _join(self.base_path(model), self.model_layers)
        roles = self._roles()
        pattern = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.+)$")
        out = SiteTable()
        found: set[str] = set()
        for site in sites:
            m = pattern.match(site.key)
            role = roles.get(m.group(2)) if m else None
            if role is None:
                out.append(dataclasses.replace(site, roles=(), sections=None, found_by="none"))
                continue
            found.add(m.group(2))
            sections = None
            if len(role) > 1:
                sections = site.sections if site.roles == role else _equal_parts(site.out_features, len(role))
            out.append(
                dataclasses.replace(
                    site,
                    stack=layers,
                    layer=int(m.group(1)),
                    roles=role,
                    sections=sections,
                    found_by="interface",
                )
            )
        required = {p for p, r in roles.items() if not p.startswith(f"{self.layer_cross_attn}.")}
        missing = sorted(required - found)
        if missing:
            example = [s.key for s in sites if s.key.startswith(f"{layers}.0.")]
            raise ConfigError(
                f"AdapterModelInterface names {missing} in the layers of {layers!r}, but no projection "
                f"has that path; the projections of layer 0 are {example}"
            )
        return out

    def _roles(self) -> dict[str, tuple[str, ...]]:
        """Path within a layer -> roles."""
        roles: dict[str, tuple[str, ...]] = {}
        for attn in (self.layer_self_attn, self.layer_cross_attn):
            if attn is None:
                continue
            if self.attn_qkv_proj is not None:
                roles[_join(attn, self.attn_qkv_proj)] = ("q", "k", "v")
            else:
                for role, path in (("q", self.attn_q_proj), ("k", self.attn_k_proj), ("v", self.attn_v_proj)):
                    roles[_join(attn, path)] = (role,)
            if self.attn_o_proj is not None:
                roles[_join(attn, self.attn_o_proj)] = ("o",)
        roles[self.layer_intermediate_proj] = ("ffn_in",)
        roles[self.layer_output_proj] = ("ffn_out",)
        return roles


def method_types(config: AdapterConfig) -> list[str]:
    """AdapterHub's method types of a config (``AdapterMethod.get_from_config``)."""
    out = ["invertible"] if getattr(config, "inv_adapter", None) else []
    if config.architecture == "union":
        for part in config.configs:
            out.extend(method_types(part))
        return out
    return [*out, config.architecture or "bottleneck"]


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _require_module(model: nn.Module, path: str, field: str) -> None:
    try:
        model.get_submodule(path)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ConfigError(
            f"AdapterModelInterface.{field} names module {path!r}, which the model does not have; "
            f"its top-level modules are {children}"
        ) from None


def _equal_parts(width: int, n: int) -> tuple[tuple[int, int], ...]:
    """AdapterHub's reading of a fused projection it knows only by name: ``n`` equal column blocks."""
    step = width // n
    return tuple(((i * step, (i + 1) * step),) for i in range(n))


__all__ = ["ADAPTER_METHODS", "AdapterModelInterface", "method_types"]
