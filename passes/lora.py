"""Insert LoRA modules after the projections they adapt: ``y = proj(x)`` becomes ``lora(x, y)``.

A site's target is one module, or a composition plan (``passes.compose``) over several: ``Stack``
chains the modules' updates (``state(x, prev)``, AdapterHub's LoRA stacking), ``Average`` averages
them, ``Sum`` applies them one after another (PEFT's several active adapters), row splits
(``BatchSplit``, ``Parallel``) and sequence splits (``Split``) give each child its part of the
batch, and the last module's ``combine(y, h)`` applies the result (``+`` for LoRA, ``⊙`` for (IA)^3).
Per-row routing (``route``) gathers each row's weights from the modules' ``routed()``
(``passes.route``); AdapterDrop as a tensor (``drop``) keeps the plain output in skipped layers.
A weight used by several calls gets the module at every call. Expert sites of a grouped matmul
(``passes.projections``) are adapted together, once per call: ``first.grouped(x, y, offs, op,
[module or None per expert])``, where ``op`` is the graph's own grouped matmul, so each row of the
sorted input meets its expert's update. ``insert_with_weight`` also hands the module the
projection's weight and bias (DoRA normalises by the adapted weight's row norms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from .compose import (
    Leaf,
    Plan,
    cat_positions,
    cat_rows,
    drop_of,
    keep_where,
    layer_numbers,
    positions_of,
    rows_of,
    split_rows,
    weighted_mean,
)
from .projections import projection_input
from .route import route_lora
from .sites import Site


def insert_lora(graph: fx.Graph, sites: list[Site], targets: dict[str, Any]) -> list[fx.Node]:
    """For each site key in ``targets``, route the projection's output through its module(s)."""
    return insert_after(graph, sites, targets)


def insert_with_weight(graph: fx.Graph, sites: list[Site], targets: dict[str, Any]) -> list[fx.Node]:
    """Like ``insert_lora``, the module called as ``module(x, y, weight, bias)``."""

    def weight_args(site: Site) -> tuple:
        weight = graph.get_attr(site.weight)
        bias = graph.get_attr(site.bias) if site.bias else None
        return (weight, bias)

    return insert_after(graph, sites, targets, weight_args, grouped=False)


def insert_after(
    graph: fx.Graph,
    sites: list[Site],
    targets: dict[str, Any],
    extra: Callable[[Site], tuple] | None = None,
    grouped: bool = True,
) -> list[fx.Node]:
    """Call each target (module or plan) on (input, output[, extra(site)...]) of its projection, at every call."""
    by_name = {n.name: n for n in graph.nodes}
    by_key = {s.key: s for s in sites}
    missing = [k for k in targets if k not in by_key]
    if missing:
        raise KeyError(f"sites {missing[:3]} are not in this graph")
    layers = layer_numbers(sites)
    added = []
    experts: dict[str, dict[int, tuple[str, str]]] = {}
    for key, tree in targets.items():
        site = by_key[key]
        tree, keep = drop_of(_leaf(tree), layers.get(key))
        if tree is None:
            continue  # AdapterDrop: this layer runs without adapters
        if site.expert is not None:
            if not grouped:
                raise ValueError(f"{key!r} is one expert of a grouped matmul, which this method cannot adapt")
            if not isinstance(tree, Leaf) or keep is not None:
                raise ValueError(
                    f"{key!r} is one expert of a grouped matmul: composition blocks do not apply there"
                )
            for name in site.nodes:
                experts.setdefault(name, {})[site.expert] = (key, tree.target)
            continue
        for name in site.nodes:  # a weight used by several calls gets the adapter at every call
            proj = by_name[name]
            x = projection_input(proj)
            more: tuple = ()
            if extra is not None:
                with graph.inserting_before(proj):
                    more = extra(site)
            src = layer_input(x)
            readers = list(proj.users)
            before = set(graph.nodes)
            with graph.inserting_before(proj.next):
                out = _apply(graph, tree, site, x, proj, None if src is x else src, None, more)
                if keep is not None:
                    out = graph.call_function(keep_where, (keep, layers[key], out, proj))
            for user in readers:
                user.replace_input_with(proj, out)
            new = [n for n in graph.nodes if n not in before]
            for node in new:
                if node.op == "call_module" or (node.op == "call_method" and node.args):
                    node.meta.setdefault("fxadapt", {"adapter": _target_of(node), "site": key})
            out.meta["fxadapt"] = {**out.meta.get("fxadapt", {}), "site": key, "output": True}
            added += new
    for name, chosen in experts.items():
        added += _insert_grouped(graph, by_name[name], chosen, by_key)
    return added


def _leaf(tree: Any) -> Leaf | Plan:
    return Leaf(tree) if isinstance(tree, str) else tree


def _target_of(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    first = node.args[0]
    return first.target if isinstance(first, fx.Node) and first.op == "get_attr" else ""


def _call(graph: fx.Graph, target: str, method: str, *args: Any) -> fx.Node:
    module = graph.get_attr(target)
    return graph.call_method(method, (module, *args))


def _apply(graph, tree, site: Site, x, y, src, batch, more: tuple = ()) -> fx.Node:
    """The projection's output ``y`` with ``tree`` applied (``more``: the weight arguments DoRA reads)."""
    if isinstance(tree, Leaf):
        args = (x, y, *more) if more else (x, y) if src is None else (x, y, src)
        return graph.call_module(tree.target, args)
    batch = tree.batch if batch is None else batch
    if tree.kind == "sum":
        for child in tree.children:
            y = _apply(graph, child, site, x, y, src, batch, more)
        return y
    if tree.kind == "route":
        if any(isinstance(c, Plan) for c in tree.children):
            raise ValueError(f"site {site.key!r}: per-row routing takes adapters, not blocks")
        weights = [None if c is None else _call(graph, c.target, "routed") for c in tree.children]
        return graph.call_function(route_lora, (x, y, tree.index, *weights))
    if tree.kind == "rows":
        parts = []
        for child, (start, stop, rows) in zip(
            tree.children, split_rows(graph, tree.sizes, len(tree.children), batch)
        ):
            part = [rows_of(graph, n, start, stop, batch) for n in (x, y, src)]
            parts.append(part[1] if child is None else _apply(graph, child, site, *part, rows, more))
        return graph.call_function(cat_rows, tuple(parts))
    if tree.kind == "split":
        _check_positions(site, x)
        parts, start = [], 0
        for child, size in zip(tree.children, tree.sizes):
            part = [positions_of(graph, n, start, start + size) for n in (x, y, src)]
            parts.append(part[1] if child is None else _apply(graph, child, site, *part, batch, more))
            start += size
        return graph.call_function(cat_positions, tuple(parts))
    h = _state(graph, tree, site, x, None, src, batch)
    return _call(graph, tree.last().target, "combine", y, h)


def _state(graph, tree, site: Site, x, prev, src, batch) -> fx.Node:
    """The update of ``tree`` (before it is combined with the output), reading ``prev`` if stacked."""
    if isinstance(tree, Leaf):
        if prev is not None and site.in_features != site.out_features:
            raise ValueError(
                f"site {site.key!r} ({site.in_features} -> {site.out_features} features) cannot chain "
                "stacked LoRA updates: AdapterHub's Stack feeds one LoRA's update into the next, which "
                "needs a square projection. Use Sum(...) to add the updates instead, or leave this "
                "projection out of one adapter"
            )
        return _call(graph, tree.target, "state", x, prev, src)
    if tree.kind == "stack":
        for child in tree.children:
            prev = _state(graph, child, site, x, prev, src, batch)
        return prev
    if tree.kind == "average":
        states = [_state(graph, c, site, x, prev, src, batch) for c in tree.children]
        return graph.call_function(weighted_mean, (tree.weights, *states))
    if tree.kind == "rows":
        parts = []
        for child, (start, stop, rows) in zip(
            tree.children, split_rows(graph, tree.sizes, len(tree.children), batch)
        ):
            if child is None:
                raise ValueError(
                    f"site {site.key!r}: a row block without an adapter cannot sit inside a Stack"
                )
            part = [rows_of(graph, n, start, stop, batch) for n in (x, prev, src)]
            parts.append(_state(graph, child, site, part[0], part[1], part[2], rows))
        return graph.call_function(cat_rows, tuple(parts))
    raise ValueError(
        f"site {site.key!r}: a {tree.kind} block cannot sit inside a Stack or Average of LoRA adapters"
    )


def _check_positions(site: Site, x: fx.Node) -> None:
    val = x.meta.get("val")
    if val is None or val.dim() < 3:
        raise ValueError(
            f"site {site.key!r}: Split needs the projection's input as [batch, seq, features], but this "
            "graph flattens it (GPT-2's Conv1D); use BatchSplit, or Split on another method"
        )


def _insert_grouped(
    graph: fx.Graph, proj: fx.Node, experts: dict[int, tuple[str, str]], by_key: dict[str, Site]
) -> list[fx.Node]:
    count = max(s.expert for s in by_key.values() if s.expert is not None and proj.name in s.nodes) + 1
    x, offs = proj.args[0], proj.args[2]
    with graph.inserting_before(proj):
        modules = [graph.get_attr(experts[e][1]) if e in experts else None for e in range(count)]
    first = next(m for m in modules if m is not None)
    with graph.inserting_after(proj):
        node = graph.call_method("grouped", (first, x, proj, offs, proj.target, modules))
    proj.replace_all_uses_with(node, delete_user_cb=lambda user, new=node: user is not new)
    key, target = experts[min(experts)]
    node.meta["fxadapt"] = {"adapter": target, "site": key, "experts": sorted(experts)}
    return [m for m in modules if m is not None] + [node]


def layer_input(x: fx.Node) -> fx.Node:
    """The (batch, seq, features) tensor a projection's input was flattened from, else the input.

    GPT-2's ``Conv1D`` runs ``addmm`` on ``x.view(-1, d)``: a module that needs the batch rows
    (a gate averaged over the sequence) gets the unflattened tensor as an extra argument.
    """
    val = x.meta.get("val")
    if val is not None and val.dim() >= 3:
        return x
    if x.op == "call_function" and any(k in str(x.target) for k in ("view", "reshape", "flatten")):
        src = x.args[0]
        src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if src_val is not None and src_val.dim() >= 3:
            return src
    return x
