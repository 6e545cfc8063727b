"""One named adapter: its config and one module per site it touches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .config import AdapterConfig
from .errors import ConfigError, FxAdaptError
from .registry import Method, method_of


def slot(site_key: str) -> str:
    """A module name for a site key (module names cannot contain dots)."""
    return site_key.replace(".", "__")


SAVED = "modules_to_save"  # prefix of the base parameters an adapter carries its own copy of


class Adapter(nn.Module):
    """Holds an adapter's per-site modules under ``layers`` and remembers which site each serves.

    ``saved`` are the adapter's own copies of base model parameters (PEFT's ``modules_to_save``,
    such as a task head): while the adapter is active the graph reads them instead of the base's.
    """

    def __init__(
        self,
        name: str,
        config: AdapterConfig,
        modules: dict[str, nn.Module],
        saved: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.site_keys = list(modules)
        self.layers = nn.ModuleDict({slot(k): m for k, m in modules.items()})
        self.saved_paths = list(saved or {})
        self.saved = nn.ParameterDict(
            {
                slot(p): nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                for p, t in (saved or {}).items()
            }
        )

    @property
    def method(self) -> Method:
        return method_of(self.config)

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        for key in self.site_keys:
            yield key, self.layers[slot(key)]

    def target(self, site_key: str, root: str = "adapters") -> str:
        return f"{root}.{self.name}.layers.{slot(site_key)}"

    def parts(self) -> list[tuple[Method, AdapterConfig, dict[str, str]]]:
        """(method, config, {part's site key: this adapter's key}) per part: one unless a union."""
        method = self.method
        if method.parts is None:
            return [(method, self.config, {k: k for k in self.site_keys})]
        out = []
        for prefix, config in method.parts(self.config):
            keys = {k[len(prefix) :]: k for k in self.site_keys if k.startswith(prefix)}
            out.append((method_of(config), config, keys))
        return out

    def site_state(self) -> dict[str, object]:
        """Tensors keyed ``<site key>.<param>`` (and ``modules_to_save.<base param>``): the names files use."""
        state = {f"{key}.{p}": t for key, m in self.items() for p, t in m.state_dict().items()}
        state.update({f"{SAVED}.{path}": self.saved[slot(path)] for path in self.saved_paths})
        return state

    def saved_targets(self, base: str, root: str = "adapters") -> dict[str, str]:
        """``{base parameter target: this adapter's copy}`` for the graph's get_attr nodes."""
        return {f"{base}.{p}": f"{root}.{self.name}.saved.{slot(p)}" for p in self.saved_paths}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def copies_of(base: nn.Module, module_paths: list[str]) -> dict[str, torch.Tensor]:
    """The parameters of ``module_paths`` in ``base`` (``{parameter path: tensor}``), for ``modules_to_save``."""
    out: dict[str, torch.Tensor] = {}
    for path in module_paths:
        try:
            module = base.get_submodule(path)
        except AttributeError:
            children = [n for n, _ in base.named_children()]
            raise ConfigError(
                f"modules_to_save names {path!r}, which the model does not have; its top-level modules are {children}"
            ) from None
        params = dict(module.named_parameters())
        if not params:
            raise ConfigError(f"modules_to_save: module {path!r} has no parameters")
        out.update({f"{path}.{n}": p for n, p in params.items()})
    return out


def saved_copies(adapters: list[Adapter], base: str = "base") -> dict[str, str]:
    """``{base parameter target: adapter copy}`` over the active adapters; two copies of one parameter clash."""
    out: dict[str, str] = {}
    for adapter in adapters:
        for src, dst in adapter.saved_targets(base).items():
            if src in out:
                raise FxAdaptError(
                    f"adapters {out[src].split('.')[1]!r} and {adapter.name!r} both carry their own "
                    f"{src[len(base) + 1 :]!r} (modules_to_save); activate one of them"
                )
            out[src] = dst
    return out
