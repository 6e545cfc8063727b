"""One named adapter: its config and one module per site it touches."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .config import AdapterConfig
from .methods import Method, method_of


def slot(site_key: str) -> str:
    """A module name for a site key (module names cannot contain dots)."""
    return site_key.replace(".", "__")


class Adapter(nn.Module):
    """Holds an adapter's per-site modules under ``layers`` and remembers which site each serves."""

    def __init__(self, name: str, config: AdapterConfig, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.site_keys = list(modules)
        self.layers = nn.ModuleDict({slot(k): m for k, m in modules.items()})

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
        """Tensors keyed ``<site key>.<param>``: the names files use."""
        return {f"{key}.{p}": t for key, m in self.items() for p, t in m.state_dict().items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
