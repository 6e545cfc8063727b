"""The composition methods of ``AdaptedModel``: AdapterFusion and parameter averaging, AdapterHub's names."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import AdapterFileError, ConfigError
from ..methods.bottleneck.sites import locations
from . import averaging, fusion_files
from .blocks import Fuse
from .fusion import AdapterFusionConfig, Fusion, FusionLayers, fusion_dropout, fusion_key


class CompositionMixin:
    """Fusion layers (``add_adapter_fusion``, ``train_adapter_fusion``, files) and ``average_adapter``."""

    # ---- AdapterFusion ---------------------------------------------------------------------------
    def add_adapter_fusion(
        self,
        adapter_names: Fuse | list[str] | str,
        config: str | dict | AdapterFusionConfig | None = None,
        name: str | None = None,
        overwrite_ok: bool = False,
        set_active: bool = False,
    ) -> str:
        """A fusion layer over these bottleneck adapters at every site where all of them live."""
        names, name = self._fusion_names(adapter_names, name)
        config = AdapterFusionConfig.load(config)
        key = fusion_key(name)
        if key in self.fusions and not overwrite_ok:
            raise ConfigError(f"a fusion named {name!r} exists; pass overwrite_ok=True to replace it")
        layers = self._fusion_layers(names, config)
        self.fusions[key] = FusionLayers(name, names, config, layers)
        self._forget_fusion(name)
        if set_active:
            self.set_active_adapters(Fuse(*names, name=name))
        return name

    def _fusion_names(self, adapter_names: Any, name: str | None) -> tuple[list[str], str]:
        if isinstance(adapter_names, Fuse):
            names, name = adapter_names.flatten(), name or adapter_names.name
        elif isinstance(adapter_names, str):
            names = adapter_names.split(",")
        elif isinstance(adapter_names, (list, tuple)):
            names = list(adapter_names)
        else:
            raise ConfigError(f"adapter_names must be a Fuse, a list or 'a,b,c', got {adapter_names!r}")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ConfigError(f"no adapter named {unknown}; adapters: {list(self.adapters)}")
        if len(set(names)) != len(names) or len(names) < 2:
            raise ConfigError(f"a fusion needs at least two different adapters, got {names}")
        return names, name or ",".join(names)

    def _fusion_layers(self, names: list[str], config: AdapterFusionConfig) -> dict[str, Fusion]:
        """One fusion layer per residual site that every fused adapter adapts."""
        residual = {loc.site.key: loc.site for loc in locations(self.sites())}
        keys = None
        for n in names:
            own = {
                k
                for method, _, part in self.adapters[n].parts()
                if "fuse" in method.compose  # ReFT also sits at residual sites, but cannot be fused
                for k in part
                if k in residual
            }
            if not own:
                raise ConfigError(
                    f"adapter {n!r} ({self.adapters[n].method.name}) has no bottleneck layer; AdapterFusion "
                    "fuses bottleneck adapters (seq_bn, double_seq_bn, par_bn, Compacter, ...)"
                )
            if keys is not None and own != keys:
                raise ConfigError(
                    f"the fused adapters do not sit at the same places ({n!r} differs); AdapterFusion needs "
                    "every adapter at every fused location"
                )
            keys = own
        ref = next((p for p in self.base.parameters() if p.is_floating_point()), None)
        dropout = fusion_dropout(config, self.config)
        layers = {}
        for key in sorted(keys, key=list(residual).index):
            layers[key] = Fusion(config, residual[key].out_features, dropout).to(ref.device, ref.dtype)
            layers[key].train(self.training)
        return layers

    def _forget_fusion(self, name: str) -> None:
        stale = [k for k in self._runners if name in _fusions_in(k[2])]
        for k in stale:
            del self._runners[k]

    def delete_adapter_fusion(self, adapter_names: Fuse | list[str] | str) -> None:
        """Remove a fusion layer (and the active setup, if it uses it)."""
        name = (
            adapter_names.name
            if isinstance(adapter_names, Fuse)
            else (adapter_names if isinstance(adapter_names, str) else ",".join(adapter_names))
        )
        if fusion_key(name) not in self.fusions:
            raise ConfigError(f"no fusion named {name!r}; fusions: {list(self.fusions)}")
        if name in _fusions_in(self._active):
            self._active = None
        del self.fusions[fusion_key(name)]
        self._forget_fusion(name)

    def train_adapter_fusion(self, adapter_setup: Any, unfreeze_adapters: bool = False) -> None:
        """Freeze everything but the fusion layers of the setup (and the fused adapters, if asked)."""
        setup = self._parse_setup(adapter_setup)
        fuses = [b for b in _top_fuses(setup)]
        if not fuses:
            raise ConfigError(f"{setup!r} has no Fuse block at its top or one level below: nothing to train")
        for fuse in fuses:
            if fusion_key(fuse.name) not in self.fusions:
                raise ConfigError(f"no fusion named {fuse.name!r}: add_adapter_fusion() it first")
        self._activate(setup, frozenset())
        for p in self.parameters():
            p.requires_grad_(False)
        for fuse in fuses:
            for p in self.fusions[fusion_key(fuse.name)].parameters():
                p.requires_grad_(True)
        if unfreeze_adapters:
            for n in setup.flatten():
                for p in self.adapters[n].parameters():
                    p.requires_grad_(True)
        self.train()

    def fusion_regularization_loss(self) -> torch.Tensor:
        """AdapterHub's ``Σ 0.01·‖I − W_v‖²`` over the fusion layers whose value matrix trains."""
        terms = [f.regularization() for f in self.fusions.values()]
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()

    get_fusion_regularization_loss = fusion_regularization_loss

    def save_adapter_fusion(
        self,
        save_directory: str | os.PathLike,
        adapter_names: Fuse | list[str] | str,
        use_safetensors: bool = False,
    ) -> None:
        """Write a fusion in AdapterHub's format (``adapter_fusion_config.json`` + weights)."""
        name = (
            adapter_names.name
            if isinstance(adapter_names, Fuse)
            else (adapter_names if isinstance(adapter_names, str) else ",".join(adapter_names))
        )
        if fusion_key(name) not in self.fusions:
            raise ConfigError(f"no fusion named {name!r}; fusions: {list(self.fusions)}")
        fusion_files.write(self, save_directory, self.fusions[fusion_key(name)], "", use_safetensors)

    def load_adapter_fusion(
        self, fusion_path: str | os.PathLike, load_as: str | None = None, set_active: bool = False
    ) -> str:
        """Load an AdapterHub fusion folder; its adapters must be loaded already. The model is unchanged on error."""
        name, names, config, tensors = fusion_files.read(self, fusion_path)
        name = load_as or name
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise AdapterFileError(
                f"fusion {name!r} fuses {missing}, which are not loaded: load_adapter() them first"
            )
        layers = self._fusion_layers(names, config)
        problems = sorted(set(layers) ^ set(tensors))
        if problems:
            raise AdapterFileError(f"fusion in {fusion_path} does not fit this model's sites: {problems[:4]}")
        for key, layer in layers.items():
            try:
                layer.load_state_dict(tensors[key])
            except RuntimeError as exc:
                raise AdapterFileError(f"fusion in {fusion_path} does not fit {key!r}: {exc}") from exc
        self.fusions[fusion_key(name)] = FusionLayers(name, names, config, layers)
        self._forget_fusion(name)
        if set_active:
            self.set_active_adapters(Fuse(*names, name=name))
        return name

    # ---- parameter averaging --------------------------------------------------------------------
    def average_adapter(
        self,
        adapter_name: str,
        adapter_list: list[str] | dict[str, float],
        weights: list[float] | None = None,
        combine_strategy: str = "linear",
        normalize_weights: bool = True,
        overwrite_ok: bool = False,
        set_active: bool = False,
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int | None = None,
    ) -> None:
        """A new adapter whose parameters combine those of ``adapter_list`` (see compose/averaging.py)."""
        names, lambdas = averaging.normalized(adapter_list, weights, normalize_weights)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ConfigError(f"no adapter named {unknown}; adapters: {list(self.adapters)}")
        self._check_new_name(adapter_name, overwrite_ok)
        sources: list[Adapter] = [self.adapters[n] for n in names]
        averaging.check(sources, combine_strategy, svd_rank, density)
        new = averaging.average(
            sources, adapter_name, lambdas, combine_strategy, svd_rank, density, majority_sign_method, seed
        )
        self._install(new, set_active)


def _fusions_in(setup: Any) -> list[str]:
    if setup is None or isinstance(setup, str):
        return []
    own = [setup.name] if isinstance(setup, Fuse) else []
    return own + [n for c in setup.children for n in _fusions_in(c)]


def _top_fuses(setup: Any) -> list[Fuse]:
    if isinstance(setup, Fuse):
        return [setup]
    if isinstance(setup, str) or setup is None:
        return []
    return [c for c in setup.children if isinstance(c, Fuse)]


__all__ = ["CompositionMixin"]
