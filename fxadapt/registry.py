"""The registry of adapter methods: a name maps to its config class, module builder and graph pass."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
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
    # ({AdapterHub tensor name: tensor}, site table) -> the same file renamed where a name means
    # something only beside the others (a model made of two AdapterHub models); before adapterhub_key
    adapterhub_prepare: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = None
    # (fxadapt name "<site key>.<param path>", site table, config, adapter name) -> the AdapterHub
    # tensor name, or several (a tensor AdapterHub stores under several modules), or none (one it does
    # not store); the inverse of adapterhub_key. Without it the method cannot be saved in AdapterHub's format.
    adapterhub_name: Callable[[str, Any, Any, str], str | Sequence[str]] | None = None
    # (config, {fxadapt name: tensor} read from an AdapterHub file, site table) -> the config that
    # fits the file; may add tensors AdapterHub does not save (initialised as AdapterHub would)
    adapterhub_fit: Callable[[Any, dict[str, torch.Tensor], Any], AdapterConfig] | None = None
    # config -> [(key prefix, part config)]: a method made of other methods' parts (a ConfigUnion)
    parts: Callable[[Any], list[tuple[str, AdapterConfig]]] | None = None
    # PEFT's name for the method (``peft_type`` in its adapter_config.json), and the reader:
    # (PEFT config dict, PEFT tensors, site table) -> (config, {fxadapt name: tensor})
    peft_type: str | None = None
    from_peft: Callable[[dict[str, Any], dict[str, torch.Tensor], Any], tuple[Any, dict]] | None = None
    # the composition blocks the pass can expand (passes.compose kinds: "stack", "sum", "average",
    # "rows" for BatchSplit/Parallel, "split", "fuse"); a block it cannot expand is refused by name
    compose: frozenset[str] = frozenset()
    # keys of modules an adapter has once, not per site (Compacter's shared parameters): every leaf
    # of the adapter gets their targets
    global_keys: tuple[str, ...] = ()
    # the method acts on the prompt's positions only (prompt tuning, ReFT): generation inserts it into
    # the prefill graph and not into the one-token decode graph
    prompt_only: bool = False
    # the writer: (adapter, adapted model) -> (PEFT config dict with its peft_type, {PEFT tensor name:
    # tensor}); raises ConfigError for an adapter PEFT cannot express. Without it, no PEFT format.
    to_peft: Callable[[Any, Any], tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None
    # For a method that shares its foreign name with another (DoRA and VeRA are AdapterHub's "lora"
    # with options, PEFT's "LORA" with use_dora): whether a foreign config dict is this method's.
    adapterhub_when: Callable[[dict[str, Any]], bool] | None = None
    peft_when: Callable[[dict[str, Any]], bool] | None = None
    # (adapter, the call's keyword arguments, base model) -> the arguments the graph gets while the
    # adapter is active (PEFT-style prefix tuning numbers the real tokens after the prefix)
    call_inputs: Callable[[Any, dict[str, Any], Any], dict[str, Any]] | None = None


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method, *aliases: str) -> Method:
    METHODS[method.name] = method
    for alias in (method.name, *aliases):
        _ALIASES[alias] = method.name
    return method


def unregister(name: str) -> None:
    """Remove a method and its aliases (a plugin or a test that registered one)."""
    METHODS.pop(name, None)
    for alias in [a for a, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


def method_names() -> list[str]:
    return sorted(_ALIASES)


def resolve_config(config: str | AdapterConfig) -> AdapterConfig:
    """A config object from a config or a config string, in AdapterHub's syntax.

    A string is a method name (``"lora"``), optionally with options (``"lora[r=4,alpha=8]"``);
    several joined with ``|`` make a union (``"lora|prefix_tuning[prefix_length=10]"``).
    """
    if isinstance(config, AdapterConfig):
        return config
    if not isinstance(config, str):
        raise ConfigError(
            f"an adapter config must be a config object or a string, got {type(config).__name__}"
        )
    parts = [p.strip() for p in config.split("|")]
    if len(parts) > 1:
        if "union" not in METHODS:
            raise ConfigError("config unions are not available")
        return METHODS["union"].config(*[resolve_config(p) for p in parts])
    m = _CONFIG_STRING.match(config.strip())
    if m is None or m["name"] not in _ALIASES:
        raise ConfigError(f"unknown adapter method {config!r}; valid names: {', '.join(method_names())}")
    base = METHODS[_ALIASES[m["name"]]].config()
    return base.replace(**_options(m["options"], config)) if m["options"] else base


_CONFIG_STRING = re.compile(r"^(?P<name>[^\[\]|]+?)\s*(?:\[(?P<options>.*)\])?$", re.S)


def _options(text: str, whole: str) -> dict[str, Any]:
    """``k=v,k2=[1,2]`` -> a dict; values are Python literals, or bare words taken as strings."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            if text[start:i].strip():
                items.append(text[start:i])
            start = i + 1
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"config string {whole!r}: {item.strip()!r} is not of the form option=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def method_of(config: AdapterConfig) -> Method:
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise ConfigError(f"no method is registered for {type(config).__name__}")


def method_for_peft_type(peft_type: Any, raw: dict[str, Any] | None = None) -> Method | None:
    """The method that reads PEFT adapters of ``peft_type`` (with config ``raw``), if any."""
    found = [m for m in METHODS.values() if m.peft_type and m.peft_type == peft_type]
    claimed = [m for m in found if m.peft_when is not None and raw is not None and m.peft_when(raw)]
    plain = [m for m in found if m.peft_when is None]
    return (claimed or plain or [None])[0]


def method_for_adapterhub(config: dict[str, Any]) -> Method:
    """The method of an AdapterHub ``config`` dict: its architecture, or a method that claims it."""
    claimed = [m for m in METHODS.values() if m.adapterhub_when is not None and m.adapterhub_when(config)]
    if len(claimed) == 1:
        return claimed[0]
    return method_for_architecture(config.get("architecture") or "bottleneck")


def peft_types(writable: bool = False) -> list[str]:
    return sorted({m.peft_type for m in METHODS.values() if m.peft_type and (m.to_peft or not writable)})


def method_for_architecture(architecture: str) -> Method:
    if isinstance(architecture, str) and architecture in _ALIASES:
        return METHODS[_ALIASES[architecture]]
    raise ConfigError(
        f"adapter architecture {architecture!r} is not supported; valid: {', '.join(method_names())}"
    )
