"""Merging adapters into the base weights and undoing it, as graph-independent weight edits.

A merge folds an adapter's update into the weights of its sites (each method's ``fold``) and keeps a
copy of every weight it touched, so ``reset_adapter`` restores them bit for bit; the adapter's nodes
leave the graphs of the setups that name it (the runtime rebuilds them with the merged names).
"""

from __future__ import annotations

from typing import Any

import torch

from passes.compose import Leaf

from .adapter import slot
from .compose.blocks import setup_names
from .compose.plan import plan
from .errors import ConfigError
from .methods.prefix_tuning import eject


class MergingMixin:
    """``merge_adapter``, ``reset_adapter``, ``merged_adapters`` and ``eject_prefix_tuning`` of
    ``AdaptedModel`` (which owns ``_backups``, the weights as they were before each merge)."""

    def merge_adapter(self, name: str) -> None:
        """Fold the adapter into the base weights and drop its nodes from the graph."""
        self._names(name)
        adapter = self.adapters[name]
        parts = adapter.parts()
        unfoldable = [m.name for m, _, _ in parts if m.fold is None]
        if unfoldable:
            raise ConfigError(f"{', '.join(unfoldable)} adapters cannot be merged into the base weights")
        if name in self._backups:
            raise ConfigError(f"adapter {name!r} is already merged")
        active = self._active
        if name in setup_names(active) and not _merges_alone(
            active, name, self.adapters, self._fusion_target
        ):
            raise ConfigError(
                f"adapter {name!r} is part of the active setup {active!r}; merged into the base weights it "
                "would act on every branch of the block. Activate it alone (or in a Sum) to merge it"
            )
        sites = self.sites().by_key()
        backups: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            try:
                for method, _, keys in parts:
                    for key, own in keys.items():
                        if key not in sites:  # a pseudo-site (shared parameters): nothing to fold
                            continue
                        site = sites[key]
                        weight = self.get_parameter(site.weight)
                        bias = self.get_parameter(site.bias) if site.bias else None
                        for target, tensor in ((site.weight, weight), (site.bias, bias)):
                            if target is not None:
                                backups.setdefault(target, tensor.detach().clone())
                        if site.expert is not None:  # one expert of a 3-D expert weight
                            weight = weight[site.expert]
                        method.fold(adapter.layers[slot(own)], weight, bias, site)
            except Exception:
                for target, original in backups.items():  # a refused fold leaves the weights as they were
                    self.get_parameter(target).copy_(original)
                raise
        self._backups[name] = backups

    def reset_adapter(self, name: str | None = None) -> None:
        """Undo merges: restore the base weights exactly as they were before merging."""
        names = list(self._backups) if name is None else [name]
        for n in names:
            if n not in self._backups:
                raise ConfigError(f"adapter {n!r} is not merged; merged: {list(self._backups)}")
        later = list(self._backups)[list(self._backups).index(names[0]) + 1 :] if name else []
        clash = [m for m in later if set(self._backups[m]) & set(self._backups[name])]
        if clash:
            raise ConfigError(f"reset {clash} first: they were merged later into the same weights")
        with torch.no_grad():
            for n in reversed(names):
                for target, original in self._backups.pop(n).items():
                    self.get_parameter(target).copy_(original)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return tuple(self._backups)

    def eject_prefix_tuning(self, name: str) -> None:
        """Replace a reparameterized prefix by its computed keys/values (``prefix_tuning_flat``)."""
        self._names(name)
        self.adapters[name] = eject(self.adapters[name])
        self._forget_graphs(name)


def _merges_alone(setup: Any, name: str, adapters: Any, fusion_target: Any) -> bool:
    """Whether ``name`` acts alone (or in a Sum of plain updates) at every one of its sites under ``setup``,
    so that folding it into the weights computes what the setup computes."""
    own = {adapters[name].target(k) for _, _, keys in adapters[name].parts() for k in keys.values()}
    for group in plan(setup, adapters, fusion_target):
        for tree in group.targets.values():
            if isinstance(tree, Leaf) or not (set(leaf.target for leaf in tree.leaves()) & own):
                continue
            if tree.kind != "sum" or not all(isinstance(c, Leaf) for c in tree.children):
                return False
    return True
