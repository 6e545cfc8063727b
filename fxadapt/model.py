"""``AdaptedModel``: one root module owning the base model and the adapters, and the graphs over them.

Every graph (train and eval, each input signature, each active setup, merged or not) is a
``GraphModule`` built over this root, so all of them share the base model's parameters. Graphs are
cached by (input signature, training flag, active adapters, merged adapters): changing batch size or
sequence length reuses the graph, and compiled graphs are marked dynamic so they do not recompile.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import TreeSpec, tree_unflatten

from passes.cleanup import cleanup, clone
from passes.compose import layer_numbers
from passes.merge import drop_modules
from passes.mode import eval_differs, to_eval
from passes.retarget import retarget
from passes.sites import SiteTable, find_sites, override_roles

from . import cache, generation, summary
from .adapter import Adapter, copies_of, saved_copies
from .capture import BASE, CONSTS, EXPORT_LOCK, Capture, capture, example_inputs, split_inputs
from .compiling import (
    artefact_key,
    check_options,
    compile_graph,
    compile_mode,
    module_device,
    start_isa_probe,
)
from .compose.api import CompositionMixin
from .compose.blocks import Split, Stack, parse_composition, setup_names
from .compose.drop import Drop, keep_inputs, runner_skip
from .compose.fusion import fusion_key
from .compose.insert import insert_setup
from .compose.plan import check_call, check_setup, normalize
from .compose.route import Route, route_call, route_inputs
from .config import AdapterConfig
from .errors import ConfigError, FxAdaptError
from .formats.api import FilesMixin
from .heads.mixin import HeadsMixin
from .interface import AdapterModelInterface
from .merging import MergingMixin
from .names import name_list, name_problem
from .registry import resolve_config
from .sizing import build_modules
from .training.checkpointing import GradientCheckpointingMixin
from .training.state import TrainingMixin


@dataclass
class _Runner:
    fn: Any
    gm: fx.GraphModule
    input_names: tuple[str, ...]
    out_spec: TreeSpec
    calls: int = 0


def _signature(tensors: dict[str, torch.Tensor], static: dict[str, Any]) -> tuple:
    return (
        tuple((k, t.dtype, t.dim()) for k, t in sorted(tensors.items())),
        tuple(sorted((k, repr(v)) for k, v in static.items())),
    )


class AdaptedModel(
    CompositionMixin,
    HeadsMixin,
    TrainingMixin,
    GradientCheckpointingMixin,
    MergingMixin,
    FilesMixin,
    nn.Module,
):
    """A Hugging Face model run through rewritten graphs, with AdapterHub's adapter methods.

    ``site_roles`` overrides role detection for an unusual model: ``{regex on site key: role}``
    (roles q, k, v, o, ffn_in, ffn_out; a tuple for a fused projection; ``()`` to exclude a site).
    ``interface`` (AdapterHub's ``AdapterModelInterface``) pins every site by module path instead;
    ``site_roles`` still applies after it. ``per_call=True`` gives each call of a weight used several
    times (ALBERT's shared layer) a site and an adapter of its own (``<key>@<i>``); by default one
    adapter per weight applies at every call, as in PEFT and AdapterHub.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool | str = False,
        compile_options: dict[str, Any] | None = None,
        example_inputs: dict[str, Any] | None = None,
        site_roles: dict[str, str | tuple[str, ...]] | None = None,
        interface: AdapterModelInterface | None = None,
        per_call: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise FxAdaptError("the model is already an AdaptedModel; add adapters to it directly")
        if interface is not None:
            if not isinstance(interface, AdapterModelInterface):
                raise ConfigError(
                    f"interface must be an AdapterModelInterface, got {type(interface).__name__}"
                )
            interface.check_model(model)
        self.interface = interface
        self.base = model
        self.adapters = nn.ModuleDict()
        self.consts = nn.Module()
        self._compile_mode = compile_mode(compile)
        self.compiled = self._compile_mode is not None
        self._compile_options = check_options(compile_options)
        self._artefacts = artefact_key(model, self._compile_mode, self._compile_options)
        start_isa_probe(self._compile_mode, self._compile_options, module_device(model))
        if self._artefacts is not None:  # what an earlier process compiled for this model, if stored
            cache.load_compiled(self._artefacts)
        self._example = example_inputs
        self._site_roles = dict(site_roles or {})
        self._per_call = bool(per_call)
        self._captures: dict[tuple, tuple[Capture, SiteTable]] = {}
        self._runners: dict[tuple, _Runner] = {}
        self.fusions = nn.ModuleDict()
        self._active: Any = None  # the active setup: None, an adapter name or a composition block
        self._skip_layers: frozenset[int] = frozenset()
        self._backups: dict[str, dict[str, torch.Tensor]] = {}
        self._default_sig: tuple | None = None
        self._init_heads()
        self._init_checkpointing()
        try:
            override_roles(SiteTable(), self._site_roles)  # refuse unknown roles now, not later
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.train(model.training)
        self._refresh_signature()

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedModel:
        # .to()/.half() replace buffer tensors: graphs built before hold the old ones, so rebuild.
        # Captures bake the device and dtype in (mask casts): capture again if either changed.
        with EXPORT_LOCK:
            before = _placement(self)
            out = super()._apply(fn, recurse)
            self._runners.clear()
            if _placement(self) != before:
                self._captures.clear()
                self._default_sig = None
                self.consts = nn.Module()
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``torch.save(model)``, ``copy.deepcopy``) without graphs: they are rebuilt on the next call."""
        parametrized = [n for n, m in self.named_modules() if torch.nn.utils.parametrize.is_parametrized(m)]
        if parametrized:
            raise FxAdaptError(
                f"{parametrized[0]} is a parametrized module (a ReFT orthogonal projection), which torch "
                "cannot pickle: save the adapters with save_adapter() or the weights with state_dict()"
            )
        return self._without_graphs()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._refresh_signature()  # the Trainer reads the call's signature from the (per-model) class

    def __deepcopy__(self, memo: dict[int, Any]) -> AdaptedModel:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._without_graphs(), memo))
        return new

    def _without_graphs(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_modules"] = {**state["_modules"], "consts": nn.Module()}
        state.update(_captures={}, _runners={}, _default_sig=None)
        return state

    # ---- calling -------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return getattr(self.base, "config", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own forward (and a head's labels); ``adapter_names=`` (one name or None per row)
        routes each row to its adapter instead of the active setup (PEFT's mixed batch, inference only;
        see docs/composition.md)."""
        runner, inputs = self._dispatch(args, kwargs)
        out = runner.fn(*inputs)
        if runner.calls < 2 and self._artefacts is not None:  # after a whole step: its backward compiled too
            runner.calls += 1
            if runner.calls == 2:
                cache.save_compiled(self._artefacts)
        return tree_unflatten(list(out), runner.out_spec)

    @torch.compiler.disable
    def _dispatch(self, args: tuple, kwargs: dict[str, Any]) -> tuple[_Runner, list[torch.Tensor]]:
        """The graph for this call and its flat tensor inputs (plain Python: an outer torch.compile
        skips it and compiles the graph call that follows)."""
        if args:
            given = inspect.signature(self.base.forward).bind_partial(*args).arguments
            kwargs = {**given, **kwargs}
        adapter_names = kwargs.pop("adapter_names", None)
        kwargs, heads, labels = self._head_call(kwargs, routed=adapter_names is not None)
        tensors, _ = split_inputs(kwargs)
        setup, extra = self._active, {}
        if adapter_names is not None:
            setup, index = route_call(
                self.adapters, adapter_names, tensors, self.training, tuple(self._backups)
            )
            extra = route_inputs(index)
        kwargs = self._call_inputs(kwargs, setup)
        tensors, _ = split_inputs(kwargs)
        runner = self._runner(kwargs, setup, heads)
        if setup is not None and not isinstance(setup, str):
            check_call(setup, tensors)
        device = next(iter(tensors.values())).device if tensors else None
        extra.update(keep_inputs(runner.input_names, self._skip_layers, self._layer_numbers(), device))
        tensors.update(extra)
        tensors.update(labels)
        return runner, [tensors[n] for n in runner.input_names]

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Generate tokens with the active adapters, as transformers' ``generate`` (greedy or sampling).

        The KV cache lives inside a prefill graph and a one-token decode graph built like every other
        graph (compiled when the model is). A ``Parallel`` setup generates ``N·B`` sequences (channel-major,
        as AdapterHub); ``adapter_names=`` (one name or None per prompt) generates each row with its own
        adapter, as PEFT's mixed batch. See docs/generation.md.
        """
        return generation.generate(self, inputs, **kwargs)

    def graph_for(self, adapter_names: list[str | None] | None = None, **kwargs: Any) -> fx.GraphModule:
        """The rewritten graph a call with these arguments runs (in the current mode and setup)."""
        kwargs, heads, _ = self._head_call(kwargs, routed=adapter_names is not None)
        setup = self._active
        if adapter_names is not None:
            tensors, _ = split_inputs(kwargs)
            setup, _ = route_call(self.adapters, adapter_names, tensors, self.training, tuple(self._backups))
        return self._runner(self._call_inputs(kwargs, setup), setup, heads).gm

    def _call_inputs(self, kwargs: dict[str, Any], setup: Any) -> dict[str, Any]:
        """The call's arguments as the setup's methods need them (``Method.call_inputs``)."""
        for name in setup_names(setup):
            hook = self.adapters[name].method.call_inputs
            if hook is not None:
                kwargs = hook(self.adapters[name], kwargs, self.base)
        return kwargs

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph for the default inputs, in the current mode and adapter setup."""
        kwargs, heads, _ = self._head_call(self._default_inputs())
        return self._runner(kwargs, None, heads).gm

    def sites(self) -> SiteTable:
        """Where adapters can attach: every projection with its layer and role."""
        if self._default_sig is None:
            self._default_sig = self._captured(self._default_inputs())
        return self._captures[self._default_sig][1]

    def _default_inputs(self) -> dict[str, Any]:
        return self._example if self._example is not None else example_inputs(self.base)

    def _captured(self, kwargs: dict[str, Any]) -> tuple:
        """The input signature of a call, captured if it is new."""
        tensors, static = split_inputs(kwargs)
        sig = _signature(tensors, static)
        if sig not in self._captures:
            with EXPORT_LOCK:  # torch.export patches process globals: one capture at a time
                if sig not in self._captures:
                    self._captures[sig] = self._capture(kwargs)
        if not self.training and eval_differs(self._captures[sig][0].graph):
            sig = (sig, "eval")  # a training-only branch other than dropout: capture eval mode itself
            if sig not in self._captures:
                with EXPORT_LOCK:
                    if sig not in self._captures:
                        self._captures[sig] = self._capture(kwargs, training=False)
        return sig

    def _runner_key(self, kwargs: dict[str, Any], setup: Any = None) -> tuple:
        return self._key_of(self._captured(kwargs), setup)

    def _key_of(self, sig: tuple, setup: Any = None) -> tuple:
        merged = tuple(n for n in self._backups)
        setup = self._active if setup is None else setup
        skip = self._skip_layers
        if skip and self.training:
            skip = runner_skip(skip, setup_names(setup), self.adapters, self._layer_numbers())
        return (sig, self.training, setup, merged, skip)

    def _layer_numbers(self) -> dict[str, int]:
        """Each layered site's layer over the whole model (encoder layers first): what skip_layers counts."""
        return layer_numbers(self.sites())

    def _runner(self, kwargs: dict[str, Any], setup: Any = None, heads: Any = None) -> _Runner:
        key = (*self._runner_key(kwargs, setup), heads)
        runner = self._runners.get(key)
        if runner is None:
            with EXPORT_LOCK:  # built once; calls on built graphs run concurrently
                runner = self._runners.get(key)
                if runner is None:
                    runner = self._runners[key] = self._build(*key)
        return runner

    def _runner_for(self, sig: tuple, make: Callable[[], Capture], setup: Any = None) -> _Runner:
        """The runner of a capture made by ``make`` (generation's prefill and decode graphs), built and
        cached like a call's: same pipeline, same key (``sig``, mode, setup, merged adapters); ``setup``
        (a per-row ``Route``) replaces the active one."""
        with EXPORT_LOCK:
            if sig not in self._captures:
                self._captures[sig] = self._adopt(make())
            key = (*self._key_of(sig, setup), None)
            if key not in self._runners:
                self._runners[key] = self._build(*key)
            return self._runners[key]

    def _capture(self, kwargs: dict[str, Any], training: bool = True) -> tuple[Capture, SiteTable]:
        with self._hf_checkpointing_paused():
            return self._adopt(capture(self.base, kwargs, training=training))

    def _adopt(self, cap: Capture) -> tuple[Capture, SiteTable]:
        """Own a capture's constants and find its sites."""
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
        sites = find_sites(fx.GraphModule(self, cap.graph), prefix=BASE + ".", per_call=self._per_call)
        if self.interface is not None:
            sites = self.interface.pin(sites, self.base)
        if self._site_roles:
            sites = override_roles(sites, self._site_roles)
        if cap.cached_sites:
            sites = SiteTable([*sites, *cap.cached_sites])
        sites.parameter, sites.graph = self.get_parameter, cap.graph
        return cap, sites

    def _build(
        self, sig: tuple, training: bool, active: Any, merged: tuple, skip: Any, heads: Any = None
    ) -> _Runner:
        cap, sites = self._captures[sig]
        graph = clone(cap.graph)
        if not training:
            to_eval(graph)
        drop = Drop.of(skip, layer_numbers(sites))
        select = None
        if cap.select is not None:  # a generation graph runs part of an adapter
            select = lambda method, targets: cap.select(method, targets, sites)  # noqa: E731
        insert_setup(
            graph,
            sites,
            active,
            self.adapters,
            self._fusion_target,
            drop=drop,
            select=select,
            parallelized=cap.parallelized,
        )
        drop_modules(graph, {self.adapters[n].target(k) for n in merged for k in self.adapters[n].site_keys})
        added = [n.target for n in graph.nodes if n.op == "placeholder"][len(cap.input_names) :]
        input_names, out_spec = self._attach_heads(graph, cap.input_names + tuple(added), cap.out_spec, heads)
        retarget(graph, saved_copies([self.adapters[n] for n in setup_names(active)]))
        gm = cleanup(fx.GraphModule(self, graph, class_name="AdaptedGraph"))
        if training:
            gm = self._checkpoint_graph(gm)
        fn = compile_graph(gm, self._compile_mode, self._compile_options, whole=cap.compile_whole)
        return _Runner(fn=self._wrap_runner(fn), gm=gm, input_names=input_names, out_spec=out_spec)

    # ---- adapters ------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        config: str | AdapterConfig = "lora",
        overwrite_ok: bool = False,
        set_active: bool = False,
        modules_to_save: list[str] | None = None,
    ) -> None:
        """Add a new adapter of the given method (a name such as ``"lora"`` or a config object).

        ``modules_to_save`` (PEFT's option): base modules, such as the task head, of which the adapter
        keeps, trains and saves its own copy, used while it is active.
        """
        config = resolve_config(config)
        self._check_new_name(name, overwrite_ok)
        saved = copies_of(self.base, modules_to_save or [])
        if self.interface is not None:
            self.interface.check_method(config)
        modules = build_modules(config, self.sites(), self.base)
        self._install(Adapter(name, config, modules, saved), set_active)

    def _check_new_name(self, name: str, overwrite_ok: bool = False, remedy: str = "") -> None:
        problem = name_problem(name)
        if problem:
            raise ConfigError(problem)
        if hasattr(nn.ModuleDict, name):
            raise ConfigError(f"adapter name {name!r} is taken by torch's module API; choose another")
        if name in self.adapters and not overwrite_ok:
            remedy = remedy or "pass overwrite_ok=True to replace it"
            raise ConfigError(f"an adapter named {name!r} exists; {remedy}")
        if name in self._backups:
            raise ConfigError(f"adapter {name!r} is merged; call reset_adapter() before replacing it")

    def _install(self, adapter: Adapter, set_active: bool = False) -> None:
        if self.interface is not None:
            self.interface.check_method(adapter.config)
        adapter.train(self.training)  # a loaded adapter's dropout follows the model's mode
        self.adapters[adapter.name] = adapter
        self._forget_graphs(adapter.name)
        if set_active:
            try:
                self.set_active_adapters(adapter.name)
            except Exception:  # an adapter that cannot apply to this graph is not left behind
                del self.adapters[adapter.name]
                self._forget_graphs(adapter.name)
                raise

    def _fusion_target(self, name: str, site_key: str) -> tuple[str, tuple] | None:
        """The fusion layer of fusion ``name`` at a site, with the options the pass needs."""
        key = fusion_key(name)
        if key not in self.fusions:
            return None
        fusion = self.fusions[key]
        target = fusion.target(site_key, f"fusions.{key}")
        return None if target is None else (target, (("query_before_ln", fusion.config.query_before_ln),))

    def _names(self, names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
        return name_list(names, self.adapters)  # known names, each once (names.py)

    def delete_adapter(self, name: str) -> None:
        self._names(name)
        if name in self._backups:
            raise ConfigError(f"adapter {name!r} is merged; call reset_adapter() before deleting it")
        if self._active is not None and name in setup_names(self._active):
            self._active = None
        del self.adapters[name]
        self._forget_graphs(name)

    def _forget_graphs(self, name: str) -> None:
        """Drop the built graphs that run adapter ``name``, and routed ones (they hold every routable adapter)."""
        stale = [
            k for k in self._runners if name in setup_names(k[2]) or name in k[3] or isinstance(k[2], Route)
        ]
        for k in stale:
            del self._runners[k]

    def set_active_adapters(self, adapter_setup: Any, skip_layers: list[int] | None = None) -> None:
        """Choose what the forward pass runs: an adapter name, a composition block, a list (a Stack).

        ``None`` runs the base model. ``skip_layers`` (AdapterDrop) leaves every adapter out of those
        layers, counted over the whole model (an encoder-decoder's decoder layers follow the encoder's);
        in training they may change every step without a new graph. See docs/composition.md.
        """
        setup = self._parse_setup(adapter_setup)
        skip = self._parse_skip(skip_layers, setup)
        self._activate(setup, skip)

    def _activate(self, setup: Any, skip: frozenset[int]) -> None:
        """Make ``setup`` active after building its graph for the default inputs, so that a setup that
        does not fit the model (a block a method cannot compose, a non-square LoRA chain, a missing
        fusion layer, a Parallel without a head per branch) is refused here, with the previous setup still
        active."""
        heads = self._heads_of(setup)
        previous = (self._active, self._skip_layers)
        self._active, self._skip_layers = setup, skip
        if setup is None:
            return
        try:
            with torch.random.fork_rng(devices=[]):
                self._runner(self._default_inputs())
        except (ConfigError, FxAdaptError):
            self._active, self._skip_layers = previous
            raise
        if heads is not None:
            self.active_head = heads  # the heads named like the setup's adapters (AdapterHub's rule)

    def _parse_setup(self, adapter_setup: Any) -> Any:
        setup = normalize(parse_composition(adapter_setup))
        check_setup(setup, self.adapters, tuple(self._backups))
        if _has(setup, Split) and getattr(self.config, "is_encoder_decoder", False):
            raise ConfigError(
                "Split cuts the sequence into fixed segments, but an encoder-decoder model runs sequences "
                "of two lengths; use BatchSplit or Parallel there"
            )
        _warn_list_of_loras(adapter_setup, setup, self.adapters)
        return setup

    def _parse_skip(self, skip_layers: Any, setup: Any) -> frozenset[int]:
        if skip_layers is None:
            return frozenset()
        if isinstance(skip_layers, (str, bytes)) or not hasattr(skip_layers, "__iter__"):
            raise ConfigError(f"skip_layers must be a list of layer indices, got {skip_layers!r}")
        layers = list(skip_layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ConfigError(f"skip_layers must hold layer indices (ints >= 0), got {layers}")
        known = set(self._layer_numbers().values())
        unknown = sorted(set(layers) - known)
        if unknown:
            raise ConfigError(
                f"skip_layers names layers {unknown}, but the model's layers are {sorted(known)}"
            )
        return frozenset(layers)

    @property
    def active_adapters(self) -> Any:
        """The active setup as AdapterHub shows it: a ``Stack`` of one name, a block, or None."""
        if isinstance(self._active, str):
            return Stack(self._active)
        return self._active

    def train_adapter(
        self, adapter_setup: Any, train_head: bool = True, train_embeddings: bool = False
    ) -> None:
        """Freeze everything but these adapters, activate them and switch to training mode.

        ``train_head``: also train the head that runs with them (the flexible head named like the last
        adapter, else the active one; a static model's task head such as ``classifier``), as AdapterHub
        and PEFT's ``modules_to_save`` do. LM output embeddings stay frozen unless ``train_embeddings``,
        which also trains the input embeddings (AdapterHub's option).
        """
        setup = self._parse_setup(adapter_setup)
        merged = [n for n in setup_names(setup) if n in self._backups]
        if merged:
            raise ConfigError(
                f"adapters {merged} are merged into the base weights, so they cannot be trained: "
                "call reset_adapter() first"
            )
        self._activate(setup, frozenset())
        for p in self.parameters():
            p.requires_grad_(False)
        for n in setup_names(setup):
            for p in self.adapters[n].parameters():
                p.requires_grad_(True)
        for p in self._head_parameters(train_head, train_embeddings):
            p.requires_grad_(True)
        self.train()

    def adapter_summary(self, as_dict: bool = False) -> str | list[dict[str, Any]]:
        """Name, method, parameters, share of the base model, active and trainable, per adapter."""
        rows = summary.rows(self)
        return rows if as_dict else summary.render(rows)


def _has(setup: Any, block: type) -> bool:
    if setup is None or isinstance(setup, str):
        return False
    return isinstance(setup, block) or any(_has(c, block) for c in setup.children)


def _warn_list_of_loras(given: Any, setup: Any, adapters: Any) -> None:
    """A plain list now means Stack (AdapterHub): say so when it stacks LoRAs that used to add up."""
    if not isinstance(given, (list, tuple)) or not isinstance(setup, Stack):
        return
    loras = [n for n in setup.flatten() if adapters[n].config.architecture == "lora"]
    if len(loras) > 1:
        warnings.warn(
            f"set_active_adapters({list(given)}) stacks {loras} as AdapterHub does: stacked LoRA updates "
            f"are chained, not added. For PEFT's sum of updates use Sum({', '.join(map(repr, loras))})",
            stacklevel=3,
        )


def _placement(module: nn.Module) -> set[tuple[torch.device, torch.dtype]]:
    return {(t.device, t.dtype) for t in (*module.parameters(), *module.buffers())}
