"""The generation graphs of an ``AdaptedModel``, built by its own pipeline and cached with its other graphs.

Each graph (``fxadapt.generation.capture``) is captured once per model and goes through the same
pipeline as a call's graph (``AdaptedModel._build``: eval mode, every active adapter inserted by its
pass, merged adapters dropped, compiled), cached under the same key (mode, active setup, merged
adapters). A graph runs the part of each adapter that belongs to it (``select``):

- the decode graph skips methods that act on the prompt only (``Method.prompt_only``: prompt tuning,
  ReFT): their positions were in the prefill;
- an encoder-decoder's encoder graph gets the encoder's sites, its decoder graphs the decoder's; a
  key that names no projection (prompt tuning's, the invertible adapter's) belongs to the first stack;
- the decode graph of an encoder-decoder reads the cross-attention keys from its cache: those k
  projections are *cached sites* (their node is the cache input), so prefix tuning still finds the
  cross-attention ops, while LoRA and the like, whose effect is already in the cached keys, skip them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.fx.experimental import _config as fx_config
from torch.utils._pytree import tree_unflatten

from passes.attention import attention_layers
from passes.bottleneck import INVERTIBLE, SHARED
from passes.prefix import insert_prefix
from passes.sites import Site

from ..capture import Capture
from ..compose.blocks import Split
from ..compose.route import route_inputs
from ..errors import ConfigError
from .capture import POSITIONS, capture_step, dims

DECODE = ("decode", "decoder_decode")
# graphs whose inputs come from an earlier graph, so already hold Parallel's channels·B rows
PARALLELIZED = ("decode", "decoder_prefill", "decoder_decode")
FIRST_STACK = ("prefill", "decode", "encoder")
CACHED = "cache"
_MARK = "fxadapt_prefill_positions"
_AT_ATTENTION = (insert_prefix,)  # passes keyed by a k site that attach at the attention op, not at the site


def _selector(
    kind: str, model_sites: set[str]
) -> Callable[[Any, dict[str, str], list[Site]], dict[str, str]]:
    """Which targets of an adapter part go into the graph ``kind`` (``model_sites``: every site key of the model)."""

    def select(method: Any, targets: dict[str, str], sites: list[Site]) -> dict[str, str]:
        if kind in DECODE and method.prompt_only:
            return {}
        by_key = {s.key: s for s in sites}
        kept = {}
        for key, target in targets.items():
            site = by_key.get(key)
            if site is None:  # another stack's site, or a key that names no projection
                keep = key not in model_sites and key != SHARED and kind in FIRST_STACK
            elif site.found_by == CACHED:
                keep = method.insert in _AT_ATTENTION
            else:
                keep = True
            if keep:
                kept[key] = target
        if kept and SHARED in targets:
            kept[SHARED] = targets[SHARED]
        return kept

    return select


def static_dims(kind: str, names: list[str], args: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """For each input of a graph, the dims that never vary (all but batch, prompt and cache lengths)."""
    symbolic = dims(kind, names)
    return [tuple(d for d in range(t.dim()) if d not in symbolic[n]) for n, t in zip(names, args)]


def _output(graph: fx.Graph, spec: Any, name: str) -> fx.Node:
    """The node a graph returns as output ``name`` (of a dict-shaped output)."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return out.args[0][list(spec.context).index(name)]


def check_setup(model: Any, seq2seq: bool, setup: Any = None) -> None:
    """Refuse, before anything runs, a setup whose generation graphs cannot compute what its forward does.

    ``setup``: the routed setup of a per-row call (None: the active one).
    """
    active = model.active_adapters if setup is None else setup
    if _splits(active):
        raise ConfigError(
            f"the active setup {active!r} has a Split, which cuts each sequence into fixed segments; a decode "
            "step is one token, so the cached generation graphs cannot split it (AdapterHub's cached "
            "generation cannot either). Generate with another setup (BatchSplit, Parallel or one adapter)"
        )
    if not seq2seq:
        return
    for name in [] if active is None else [active] if isinstance(active, str) else active.flatten():
        for _, _, keys in model.adapters[name].parts():
            if INVERTIBLE in keys:
                raise ConfigError(
                    f"adapter {name!r} has an invertible adapter: generate() on an encoder-decoder model runs "
                    "the encoder and the decoder as separate graphs and cannot place its inverse; "
                    "use a bottleneck config without inv_adapter for generation"
                )


def _splits(setup: Any) -> bool:
    if setup is None or isinstance(setup, str):
        return False
    return isinstance(setup, Split) or any(_splits(c) for c in setup.children)


class Graphs:
    """Runs the generation graphs of one model in its current setup (built on first use).

    ``route`` (per-row ``adapter_names=``): the routed setup and its per-row index, an input of every graph.
    """

    def __init__(self, model: Any, route: tuple[Any, torch.Tensor] | None = None) -> None:
        self.model = model
        self.base = model.base
        self.setup, index = route if route is not None else (None, None)
        self.extra = {} if index is None else route_inputs(index)

    def inputs(self, runner: Any, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The graph's inputs: the call's tensors and what the setup adds (each row's adapter)."""
        return [tensors[n] if n in tensors else self.extra[n] for n in runner.input_names]

    def position_offset(self) -> int:
        """Where the real tokens' positions start: after a prefix numbered as PEFT's (``positions=
        "before_tokens"``, as after a cache holding it), else 0; read off the setup's ``call_inputs``."""
        setup = self.setup if self.setup is not None else self.model._active
        probe = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
        positions = self.model._call_inputs(probe, setup).get("position_ids")
        return 0 if positions is None else int(positions[0, 0])

    def run(self, kind: str, tensors: dict[str, torch.Tensor]) -> Any:
        runner = self.runner(kind, tensors)
        args = self.inputs(runner, tensors)
        out = self.call(runner.fn, args, static_dims(kind, runner.input_names, args))
        return tree_unflatten(list(out), runner.out_spec)

    def call(self, fn: Callable, args: list[torch.Tensor], static: list[tuple[int, ...]]) -> Any:
        """Call a graph; a compiled one treats batch, prompt and cache lengths as symbols, every other dim as fixed.

        Dynamo would otherwise specialise a batch of 1 or a 1-token prompt (0/1 specialisation) and, by
        giving equal sizes one symbol (duck shaping), could tie the batch to a head count: each a recompile.
        """
        if not self.model.compiled:
            return fn(*args)
        for t, fixed in zip(args, static):
            if fixed:
                torch._dynamo.mark_static(t, fixed)
        with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True):
            return fn(*args)

    def runner(self, kind: str, tensors: dict[str, torch.Tensor]) -> Any:
        layers = sum(1 for n in tensors if n.startswith("key_"))
        sig = ("generate", kind, tuple(sorted((k, t.dtype, t.dim()) for k, t in tensors.items())))
        return self.model._runner_for(sig, lambda: self._capture(kind, tensors, layers), self.setup)

    def _capture(self, kind: str, tensors: dict[str, torch.Tensor], layers: int) -> Capture:
        cap = capture_step(self.base, kind, tensors, layers)
        cap.select = _selector(kind, set(self.model.sites().by_key()))
        cap.parallelized = kind in PARALLELIZED
        cap.compile_whole = True
        if kind == "decoder_decode":
            cap.cached_sites = self._cross_sites(cap)
        if kind == "prefill":
            _output(cap.graph, cap.out_spec, POSITIONS).meta[_MARK] = True
        return cap

    @staticmethod
    def positions_follow_prompt(runner: Any) -> bool:
        """Whether the model reads its positions after the point where a pass lengthened the prompt.

        Prompt tuning re-derives the prefill's ``arange(S) - pads`` from ``S + P`` for every node after
        its insertion point: rotary embeddings in the layers then number the prompt ``0..P-1`` and the
        tokens after it, and the tokens generated next continue from ``P + S``. Position embeddings
        added before the insertion point (GPT-2's) keep ``S``: the original node survives, read by the
        embedding block, and the new tokens continue from ``S``.
        """
        graph = runner.gm.graph
        returned = _output(graph, runner.out_spec, POSITIONS)
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        live, todo = set(), [a for a in out.all_input_nodes if a is not returned]
        while todo:  # what the outputs other than the positions are computed from
            node = todo.pop()
            if node not in live:
                live.add(node)
                todo.extend(node.all_input_nodes)
        return not any(n.meta.get(_MARK) and n is not returned for n in live)

    def _cross_sites(self, cap: Capture) -> list[Site]:
        """The cross-attention k projections of the model, each placed at its cache input."""
        placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
        inputs = dict(zip(cap.input_names, placeholders))
        sites = self.model.sites()
        by_key = sites.by_key()
        out = []
        for layer in attention_layers(sites):
            node = inputs.get(f"cross_key_{layer.position}")
            if layer.location == "cross" and node is not None:
                out.append(dataclasses.replace(by_key[layer.key], node=node.name, calls=(), found_by=CACHED))
        return out
