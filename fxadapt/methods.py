"""The registry of adapter methods: a name maps to its config class, module builder and graph pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .config import AdapterConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    """What the runtime needs to know about one method, and nothing about any other."""

    name: str
    config: type[AdapterConfig]
    # (config, site table, dtype, device) -> {site key: module}
    build: Callable[[Any, Any, torch.dtype, torch.device], dict[str, nn.Module]]
    # (graph, sites, {site key: module target}) -> inserted nodes
    insert: Callable[[fx.Graph, Any, dict[str, str]], list[fx.Node]]
    # (module, weight, bias or None, site) -> None: folds the module into the base weights in place
    fold: Callable[[nn.Module, torch.Tensor, torch.Tensor | None, Any], None] | None = None
    # (AdapterHub tensor name, site table, config) -> fxadapt name "<site key>.<param>", or None if foreign
    adapterhub_key: Callable[[str, Any, Any], str | None] | None = None


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method, *aliases: str) -> Method:
    METHODS[method.name] = method
    for alias in (method.name, *aliases):
        _ALIASES[alias] = method.name
    return method


def method_names() -> list[str]:
    return sorted(_ALIASES)


def resolve_config(config: str | AdapterConfig) -> AdapterConfig:
    """A config object from a config or a method name such as ``"lora"``."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str) and config in _ALIASES:
        return METHODS[_ALIASES[config]].config()
    raise ConfigError(f"unknown adapter method {config!r}; valid names: {', '.join(method_names())}")


def method_of(config: AdapterConfig) -> Method:
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise ConfigError(f"no method is registered for {type(config).__name__}")


def method_for_architecture(architecture: str) -> Method:
    if architecture in _ALIASES:
        return METHODS[_ALIASES[architecture]]
    raise ConfigError(
        f"adapter architecture {architecture!r} is not supported; valid: {', '.join(method_names())}"
    )
