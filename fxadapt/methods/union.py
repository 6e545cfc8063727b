"""Config unions: several methods in one adapter (AdapterHub's ``ConfigUnion``, ``MAMConfig``, ``UniPELTConfig``).

A union is one adapter whose parts are other methods' adapters. Part ``i``'s modules are keyed
``<i>.<site key>``, so the parts never collide, and each part is inserted by its own method's pass,
in the order given. ``"lora|prefix_tuning"`` (see ``registry.resolve_config``) builds a union too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig, check
from ..errors import ConfigError
from ..registry import Method, method_for_architecture, method_of, register, resolve_config
from .bottleneck import BnConfig, ParBnConfig, SeqBnConfig
from .lora import LoRAConfig
from .prefix_tuning import PrefixTuningConfig


class ConfigUnion(AdapterConfig):
    """Several method configs making up one adapter: ``ConfigUnion(LoRAConfig(), PrefixTuningConfig())``."""

    architecture = "union"

    def __init__(self, *configs: AdapterConfig | str) -> None:
        self.configs = [resolve_config(c) for c in configs]
        self.validate()

    def verify(self) -> None:
        """Every part's fields and ranges, then the union's own rules."""
        check(isinstance(self.configs, list), "ConfigUnion.configs must be a list of configs")
        for c in self.configs:
            check(isinstance(c, AdapterConfig), f"a ConfigUnion holds configs, got {type(c).__name__}")
            c.verify()
        self.validate()

    def validate(self) -> None:
        check(bool(self.configs), "a ConfigUnion needs at least one config")
        for c in self.configs:
            check(not isinstance(c, ConfigUnion), f"a ConfigUnion cannot contain another union ({c!r})")
        for i, a in enumerate(self.configs):
            for b in self.configs[:i]:
                _check_pair(b, a)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.configs == other.configs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.configs))})"

    def __getitem__(self, i: int) -> AdapterConfig:
        return self.configs[i]

    def __len__(self) -> int:
        return len(self.configs)

    def to_dict(self) -> dict[str, Any]:
        # "method" keeps a part's preset (seq_bn, not just bottleneck) through fxadapt's own files
        parts = [{**c.to_dict(), "method": method_of(c).name} for c in self.configs]
        return {"architecture": self.architecture, "configs": parts}

    def to_adapterhub_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "configs": [c.to_adapterhub_dict() for c in self.configs]}

    def replace(self, **changes: Any) -> ConfigUnion:
        """Apply each change to every part that has the option (``"mam[prefix_length=3]"``); an option
        that no part has is refused."""
        names = [{f.name for f in dataclasses.fields(c)} for c in self.configs]
        unknown = sorted(k for k in changes if not any(k in n for n in names))
        if unknown:
            valid = sorted(set().union(*names))
            raise ConfigError(f"no part of this union has option(s) {unknown}; valid options: {valid}")
        return self._of(
            [c.replace(**{k: v for k, v in changes.items() if k in n}) for c, n in zip(self.configs, names)]
        )

    @classmethod
    def _of(cls, configs: list[AdapterConfig]) -> ConfigUnion:
        out = cls.__new__(cls)
        ConfigUnion.__init__(out, *configs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfigUnion:
        check(isinstance(data, dict), f"{cls.__name__}: a config must be a dict of options, got {data!r:.60}")
        data = dict(data)
        arch = data.pop("architecture", "union")
        if arch != "union":
            raise ConfigError(f"config is for architecture {arch!r}, not a union")
        parts = data.pop("configs", None)
        if data:
            raise ConfigError(f"{cls.__name__} has no option(s) {sorted(data)}; valid options: ['configs']")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise ConfigError(f"{cls.__name__}: 'configs' must be a list of config dicts")
        return cls._of([_part(p) for p in parts])


def _part(data: dict[str, Any]) -> AdapterConfig:
    data = dict(data)
    # AdapterHub writes no "method", and no architecture for bottleneck adapters.
    method = method_for_architecture(data.pop("method", None) or data.get("architecture") or "bottleneck")
    if data.get("architecture") is None:
        data.pop("architecture", None)
    return method.config.from_dict(data)


def _check_pair(a: AdapterConfig, b: AdapterConfig) -> None:
    """AdapterHub's rule: two parts of one architecture clash unless they sit in different places."""
    if a.architecture != b.architecture or getattr(a, "leave_out", None) or getattr(b, "leave_out", None):
        return
    if isinstance(a, BnConfig) and isinstance(b, BnConfig):
        if a.mh_adapter != b.mh_adapter and a.output_adapter != b.output_adapter:
            return
    raise ConfigError(
        f"{type(a).__name__} and {type(b).__name__} are both {a.architecture!r} adapters at the same "
        "places, so a union cannot hold both; give them different locations or leave_out layers"
    )


class MAMConfig(ConfigUnion):
    """Mix-and-Match (He et al., 2021): prefix tuning (bottleneck 800) plus a parallel FFN adapter."""

    def __init__(
        self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None
    ) -> None:
        prefix_tuning = prefix_tuning or PrefixTuningConfig(bottleneck_size=800)
        adapter = adapter or ParBnConfig()
        check(
            isinstance(prefix_tuning, PrefixTuningConfig),
            "MAMConfig.prefix_tuning must be a PrefixTuningConfig",
        )
        check(isinstance(adapter, BnConfig), "MAMConfig.adapter must be a bottleneck config (BnConfig)")
        super().__init__(prefix_tuning, adapter)

    @property
    def prefix_tuning(self) -> AdapterConfig:
        return self.configs[0]

    @property
    def adapter(self) -> AdapterConfig:
        return self.configs[1]


class UniPELTConfig(ConfigUnion):
    """UniPELT (Mao et al., 2022): gated prefix tuning, sequential bottleneck adapter and LoRA."""

    def __init__(
        self,
        prefix_tuning: PrefixTuningConfig | None = None,
        adapter: BnConfig | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        parts = [
            prefix_tuning or PrefixTuningConfig(prefix_length=10),
            adapter or SeqBnConfig(reduction_factor=16),
            lora or LoRAConfig(r=8),
        ]
        super().__init__(*[c.replace(use_gating=True) for c in parts])


def parts(config: ConfigUnion) -> list[tuple[str, AdapterConfig]]:
    return [(f"{i}.", c) for i, c in enumerate(config.configs)]


def build(config: ConfigUnion, sites: Any, dtype: torch.dtype, device: Any) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {}
    for prefix, part in parts(config):
        for key, module in method_of(part).build(part, sites, dtype, device).items():
            modules[prefix + key] = module
    return modules


def insert(*_: Any) -> list:
    raise ConfigError("a union is inserted part by part (Adapter.parts), never as a whole")


def adapterhub_key(key: str, sites: Any, config: ConfigUnion) -> str | None:
    """AdapterHub names a union's tensors as its parts do: the first part that claims a name owns it."""
    for prefix, part in parts(config):
        hook = method_of(part).adapterhub_key
        mapped = hook(key, sites, part) if hook else None
        if mapped is not None:
            return prefix + mapped
    return None


def _part_of(key: str, config: ConfigUnion) -> tuple[AdapterConfig, str]:
    index, _, rest = key.partition(".")
    return config.configs[int(index)], rest


def adapterhub_name(key: str, sites: Any, config: ConfigUnion, name: str) -> Any:
    """A part's tensor keeps the name its own method gives it (AdapterHub's layout for unions)."""
    part, rest = _part_of(key, config)
    hook = method_of(part).adapterhub_name
    if hook is None:
        raise ConfigError(f"the union's {method_of(part).name} part has no AdapterHub tensor names")
    return hook(rest, sites, part, name)


def adapterhub_fit(config: ConfigUnion, tensors: dict[str, torch.Tensor], sites: Any) -> ConfigUnion:
    fitted = []
    for prefix, part in parts(config):
        fit = method_of(part).adapterhub_fit
        if fit is None:
            fitted.append(part)
            continue
        own = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
        fitted.append(fit(part, own, sites))
        tensors.update({prefix + k: t for k, t in own.items()})
    return config if fitted == config.configs else type(config)._of(fitted)


def _register(name: str, config: type[ConfigUnion]) -> Method:
    return register(
        Method(
            name,
            config,
            build,
            insert,
            None,
            adapterhub_key,
            adapterhub_name=adapterhub_name,
            adapterhub_fit=adapterhub_fit,
            parts=parts,
        )
    )


UNION = _register("union", ConfigUnion)
MAM = _register("mam", MAMConfig)
UNIPELT = _register("unipelt", UniPELTConfig)
