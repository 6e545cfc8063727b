"""``AdaptedModel``: one root module owning the base model and the adapters, and the graphs over them.

Every graph (train and eval, each input signature, each active setup, merged or not) is a
``GraphModule`` built over this root, so all of them share the base model's parameters. Graphs are
cached by (input signature, training flag, active adapters, merged adapters): changing batch size or
sequence length reuses the graph, and compiled graphs are marked dynamic so they do not recompile.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import TreeSpec, tree_unflatten

from passes.cleanup import cleanup, clone
from passes.merge import drop_modules
from passes.mode import to_eval
from passes.sites import SiteTable, find_sites, override_roles

from . import files, summary
from .adapter import Adapter, slot
from .capture import BASE, CONSTS, Capture, capture, example_inputs, split_inputs
from .config import AdapterConfig
from .errors import ConfigError, FxAdaptError
from .methods import method_of, resolve_config


@dataclass
class _Runner:
    fn: Any
    gm: fx.GraphModule
    input_names: tuple[str, ...]
    out_spec: TreeSpec


def _signature(tensors: dict[str, torch.Tensor], static: dict[str, Any]) -> tuple:
    return (
        tuple((k, t.dtype, t.dim()) for k, t in sorted(tensors.items())),
        tuple(sorted((k, repr(v)) for k, v in static.items())),
    )


class AdaptedModel(nn.Module):
    """A Hugging Face model run through rewritten graphs, with AdapterHub's adapter methods.

    ``site_roles`` overrides role detection for an unusual model: ``{regex on site key: role}``
    (roles q, k, v, o, ffn_in, ffn_out; a tuple for a fused projection; ``()`` to exclude a site).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        example_inputs: dict[str, Any] | None = None,
        site_roles: dict[str, str | tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise FxAdaptError("the model is already an AdaptedModel; add adapters to it directly")
        self.base = model
        self.adapters = nn.ModuleDict()
        self.consts = nn.Module()
        self.compiled = compile
        self._compile_options = dict(compile_options or {})
        self._example = example_inputs
        self._site_roles = dict(site_roles or {})
        self._captures: dict[tuple, tuple[Capture, SiteTable]] = {}
        self._runners: dict[tuple, _Runner] = {}
        self._active: tuple[str, ...] = ()
        self._backups: dict[str, dict[str, torch.Tensor]] = {}
        self._default_sig: tuple | None = None
        try:
            override_roles(SiteTable(), self._site_roles)  # refuse unknown roles now, not later
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.train(model.training)

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedModel:
        # .to()/.half() replace buffer tensors: graphs built before hold the old ones, so rebuild.
        out = super()._apply(fn, recurse)
        self._runners.clear()
        return out

    # ---- calling -------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return getattr(self.base, "config", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = dict(inspect.signature(self.base.forward).bind_partial(*args, **kwargs).arguments)
        runner = self._runner(kwargs)
        tensors, _ = split_inputs(kwargs)
        out = runner.fn(*[tensors[n] for n in runner.input_names])
        return tree_unflatten(list(out), runner.out_spec)

    def graph_for(self, **kwargs: Any) -> fx.GraphModule:
        """The rewritten graph a call with these arguments runs (in the current mode and setup)."""
        return self._runner(kwargs).gm

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph for the default inputs, in the current mode and adapter setup."""
        return self._runner(self._default_inputs()).gm

    def sites(self) -> SiteTable:
        """Where adapters can attach: every projection with its layer and role."""
        if self._default_sig is None:
            self._default_sig = self._runner_key(self._default_inputs())[0]
        return self._captures[self._default_sig][1]

    def _default_inputs(self) -> dict[str, Any]:
        return self._example if self._example is not None else example_inputs(self.base)

    def _runner_key(self, kwargs: dict[str, Any]) -> tuple:
        tensors, static = split_inputs(kwargs)
        sig = _signature(tensors, static)
        if sig not in self._captures:
            self._captures[sig] = self._capture(kwargs)
        merged = tuple(n for n in self._backups)
        return (sig, self.training, self._active, merged)

    def _runner(self, kwargs: dict[str, Any]) -> _Runner:
        key = self._runner_key(kwargs)
        if key not in self._runners:
            self._runners[key] = self._build(*key)
        return self._runners[key]

    def _capture(self, kwargs: dict[str, Any]) -> tuple[Capture, SiteTable]:
        cap = capture(self.base, kwargs, training=True)
        holder = nn.Module()
        for name, value in cap.constants.items():
            if isinstance(value, nn.Module):
                holder.add_module(name, value)
            else:
                holder.register_buffer(name, value, persistent=False)
        slot = f"c{len(self._captures)}"
        self.consts.add_module(slot, holder)
        for node in cap.graph.nodes:
            if node.op == "get_attr" and node.target.startswith(CONSTS + "."):
                node.target = f"{CONSTS}.{slot}.{node.target[len(CONSTS) + 1 :]}"
        sites = find_sites(fx.GraphModule(self, cap.graph), prefix=BASE + ".")
        if self._site_roles:
            sites = override_roles(sites, self._site_roles)
        return cap, sites

    def _build(self, sig: tuple, training: bool, active: tuple[str, ...], merged: tuple) -> _Runner:
        cap, sites = self._captures[sig]
        graph = clone(cap.graph)
        if not training:
            to_eval(graph)
        for name in active:
            adapter = self.adapters[name]
            try:
                for method, _, keys in adapter.parts():
                    method.insert(graph, sites, {k: adapter.target(key) for k, key in keys.items()})
            except (KeyError, ValueError) as exc:
                raise FxAdaptError(f"adapter {name!r} does not fit the graph of this call: {exc}") from exc
        drop_modules(graph, {self.adapters[n].target(k) for n in merged for k in self.adapters[n].site_keys})
        gm = cleanup(fx.GraphModule(self, graph, class_name="AdaptedGraph"))
        fn = torch.compile(gm, **{"dynamic": True, **self._compile_options}) if self.compiled else gm
        return _Runner(fn=fn, gm=gm, input_names=cap.input_names, out_spec=cap.out_spec)

    # ---- adapters ------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        config: str | AdapterConfig = "lora",
        overwrite_ok: bool = False,
        set_active: bool = False,
    ) -> None:
        """Add a new adapter of the given method (a name such as ``"lora"`` or a config object)."""
        config = resolve_config(config)
        self._check_new_name(name, overwrite_ok)
        ref = next((p for p in self.base.parameters() if p.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        modules = method_of(config).build(config, self.sites(), dtype, device)
        self._install(Adapter(name, config, modules), set_active)

    def _check_new_name(self, name: str, overwrite_ok: bool = False, remedy: str = "") -> None:
        if not isinstance(name, str) or not name or "." in name or not name.isprintable():
            raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.adapters and not overwrite_ok:
            remedy = remedy or "pass overwrite_ok=True to replace it"
            raise ConfigError(f"an adapter named {name!r} exists; {remedy}")
        if name in self._backups:
            raise ConfigError(f"adapter {name!r} is merged; call reset_adapter() before replacing it")

    def _install(self, adapter: Adapter, set_active: bool = False) -> None:
        adapter.train(self.training)  # a loaded adapter's dropout follows the model's mode
        self.adapters[adapter.name] = adapter
        self._forget_graphs(adapter.name)
        if set_active:
            self.set_active_adapters(adapter.name)

    def _names(self, names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
        if names is None:
            return ()
        names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ConfigError(f"no adapter named {unknown}; adapters: {list(self.adapters)}")
        return names

    def delete_adapter(self, name: str) -> None:
        self._names(name)
        if name in self._backups:
            raise ConfigError(f"adapter {name!r} is merged; call reset_adapter() before deleting it")
        self._active = tuple(n for n in self._active if n != name)
        del self.adapters[name]
        self._forget_graphs(name)

    def _forget_graphs(self, name: str) -> None:
        """Drop the built graphs that run adapter ``name``; others stay valid (and compiled)."""
        stale = [k for k in self._runners if name in k[2] or name in k[3]]
        for k in stale:
            del self._runners[k]

    def set_active_adapters(self, names: str | list[str] | None) -> None:
        """Choose the adapters the forward pass runs (in order); None runs the base model."""
        self._active = self._names(names)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._active

    def train_adapter(self, names: str | list[str]) -> None:
        """Freeze everything but these adapters, activate them and switch to training mode."""
        names = self._names(names)
        for p in self.parameters():
            p.requires_grad_(False)
        for n in names:
            for p in self.adapters[n].parameters():
                p.requires_grad_(True)
        self.set_active_adapters(list(names))
        self.train()

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
        sites = self.sites().by_key()
        backups: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            try:
                for method, _, keys in parts:
                    for key, own in keys.items():
                        site = sites[key]
                        weight = self.get_parameter(site.weight)
                        bias = self.get_parameter(site.bias) if site.bias else None
                        for target, tensor in ((site.weight, weight), (site.bias, bias)):
                            if target is not None:
                                backups.setdefault(target, tensor.detach().clone())
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
        from .prefix_tuning import eject

        self._names(name)
        self.adapters[name] = eject(self.adapters[name])
        self._forget_graphs(name)

    def adapter_summary(self, as_dict: bool = False) -> str | list[dict[str, Any]]:
        """Name, method, parameters, share of the base model, active and trainable, per adapter."""
        rows = summary.rows(self)
        return rows if as_dict else summary.render(rows)

    # ---- files ---------------------------------------------------------------------------------
    def save_adapter(
        self, save_directory: str | os.PathLike, adapter_name: str, format: str = "fxadapt"
    ) -> None:
        """Write one adapter into ``save_directory`` (created if missing), each file atomically.

        ``format="fxadapt"``: ``adapter_config.json`` + ``adapter.safetensors``, every fxadapt option.
        ``format="adapterhub"``: what AdapterHub's ``save_adapter`` writes (``adapter_config.json`` +
        ``pytorch_adapter.bin``), so that its ``model.load_adapter(save_directory)`` loads it; an option
        AdapterHub cannot express (LoRA's ``fused_qkv="joint"`` or ``target_sites``) raises ConfigError
        before anything is written. See docs/formats.md.
        """
        self._names(adapter_name)
        files.save(self, save_directory, adapter_name, format)

    def load_adapter(
        self,
        adapter_name_or_path: str | os.PathLike,
        load_as: str | None = None,
        set_active: bool = False,
        revision: str | None = None,
    ) -> str:
        """Load an fxadapt, AdapterHub or PEFT adapter from a folder or a Hub repo id ("org/name").

        The model is unchanged on any error.
        """
        adapter = files.load(self, adapter_name_or_path, load_as, revision)
        self._check_new_name(adapter.name, remedy="pass load_as='other_name', or delete_adapter() it first")
        self._install(adapter, set_active)
        return adapter.name
