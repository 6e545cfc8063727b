"""Insert ReFT interventions on the output of transformer layers (the residual stream after each layer).

A layer's output is the node the next layer reads: the residual add of its FFN block (pre-LN:
GPT-2, Llama) or the layer norm after that add (post-LN: BERT, BART). It is found from the layer's
``ffn_out`` projection site with ``passes.bottleneck.find_residual``, so nothing here knows about
model classes. If a bottleneck adapter already replaced that residual step, its node is the layer
output. The intervention node is ``call_module(target, (out, bounds))``; every former reader of
``out`` reads the intervention instead.

``bounds`` (``[B, 2]``) places the intervened positions on each row's real tokens, as AdapterHub 1.3
does from the call's attention mask: ``real_token_bounds(mask)`` is computed once per mask from the
graph input named ``attention_mask`` (or ``decoder_attention_mask``, ...) whose sequence dim is the
layer output's (the same symbol). A layer with no such input (the call passed no mask, or a decoder
whose own mask was not passed) is called as ``call_module(target, (out,))``: the positions are then
the ends of the sequence.

A site's target may be a composition plan (``passes.compose``): ``Stack`` applies the interventions
one after another (each reads the previous one's output, at its own positions), row splits
(``BatchSplit``, ``Parallel``) give each block of rows its own intervention on those rows, with
those rows' bounds; rows of a block without an intervention pass unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .bottleneck import find_residual
from .compose import Leaf, Plan, cat_rows, graph_input, rows_of, split_rows
from .sites import Site


def real_token_bounds(mask: torch.Tensor) -> torch.Tensor:
    """``[B, 2]``: each row's first real position and the end of its real tokens, AdapterHub's rule.

    AdapterHub 1.3 (``ModelAdaptersMixin.forward_context``) takes the offset ``mask.argmax(1)`` (the
    first 1 of the row: 0 with right padding, the number of pad positions with left padding) and the
    length ``(mask == 1).sum(-1)``; the end is offset + length. A row without any 1 gets ``[0, 0]``.
    """
    real = mask == 1
    first = real.to(torch.int64).argmax(1)
    return torch.stack([first, first + real.sum(-1, dtype=torch.int64)], dim=1)


def _dim_key(d: object) -> object:
    return d.node.expr if isinstance(d, torch.SymInt) else d


def find_mask(graph: fx.Graph, out: fx.Node) -> fx.Node | None:
    """The attention mask input ``[B, S]`` whose ``S`` is the sequence dim of ``out`` (``[B, S, H]``)."""
    val = out.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 3:
        return None
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "placeholder" or not (name == "attention_mask" or name.endswith("_attention_mask")):
            continue
        m = node.meta.get("val")
        if isinstance(m, torch.Tensor) and m.dim() == 2 and _dim_key(m.shape[1]) == _dim_key(val.shape[1]):
            return node
    return None


def layer_output(graph: fx.Graph, site: Site) -> fx.Node:
    """The output of the layer whose FFN output projection is ``site``."""
    for node in graph.nodes:
        meta = node.meta.get("fxadapt") if node.op == "call_module" else None
        if (
            meta
            and meta.get("site") == site.key
            and meta.get("kind") == "bottleneck"
            and meta.get("call") == site.node
        ):
            return node
    res = find_residual(graph, site)
    return res.norm if res.norm is not None else res.add


def insert_reft(graph: fx.Graph, sites: list[Site], targets: dict[str, Any]) -> list[fx.Node]:
    """For each ``ffn_out`` site key in ``targets``, route that layer's output through its module(s)."""
    by_key = {s.key: s for s in sites}
    missing = [k for k in targets if k not in by_key]
    if missing:
        raise KeyError(f"sites {missing[:3]} are not in this graph")
    by_name = {n.name for n in graph.nodes}
    added = []
    bounds: dict[fx.Node, fx.Node] = {}  # mask input -> its real_token_bounds, computed once
    calls = [call for s in sites if s.key in targets for call in s.each_call()]
    for site in calls:  # graph order
        if site.node not in by_name:
            raise KeyError(f"site {site.key!r} is not in this graph")
        tree = targets[site.key]
        tree = Leaf(tree) if isinstance(tree, str) else tree
        out = layer_output(graph, site)
        mask = find_mask(graph, out)
        before = set(graph.nodes)
        with graph.inserting_before(out.next):
            if mask is not None and mask not in bounds:
                bounds[mask] = graph.call_function(real_token_bounds, (graph_input(mask),))
            node = _apply(graph, tree, out, bounds.get(mask), None, site.key)
        new = [n for n in graph.nodes if n not in before]
        out.replace_all_uses_with(node, delete_user_cb=lambda user, made=set(new): user not in made)
        if "val" in out.meta:
            node.meta["val"] = out.meta["val"]
        node.meta["fxadapt"] = {**node.meta.get("fxadapt", {}), "site": site.key, "kind": "reft"}
        added += new
    return added


def _apply(graph: fx.Graph, tree: Leaf | Plan, h: fx.Node, bounds: Any, batch: Any, key: str) -> fx.Node:
    """``h`` (a layer output) through ``tree``'s interventions."""
    if isinstance(tree, Leaf):
        node = graph.call_module(tree.target, (h,) if bounds is None else (h, bounds))
        node.meta["fxadapt"] = {"adapter": tree.target, "site": key, "kind": "reft"}
        return node
    batch = tree.batch if batch is None else batch
    if tree.kind == "stack":
        for child in tree.children:
            h = _apply(graph, child, h, bounds, batch, key)
        return h
    if tree.kind == "rows":
        parts = []
        for child, (start, stop, rows) in zip(
            tree.children, split_rows(graph, tree.sizes, len(tree.children), batch)
        ):
            hi, bi = rows_of(graph, h, start, stop, batch), rows_of(graph, bounds, start, stop, batch)
            parts.append(hi if child is None else _apply(graph, child, hi, bi, rows, key))
        return graph.call_function(cat_rows, tuple(parts))
    raise ValueError(
        f"site {key!r}: ReFT composes with Stack, BatchSplit and Parallel only, not {tree.kind}: an "
        "intervention rewrites a few positions of the residual stream, which is not averaged or fused"
    )
