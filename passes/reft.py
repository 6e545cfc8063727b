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
"""

from __future__ import annotations

import torch
from torch import fx

from .bottleneck import find_residual
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
        if meta and meta.get("site") == site.key and meta.get("kind") == "bottleneck":
            return node
    res = find_residual(graph, site)
    return res.norm if res.norm is not None else res.add


def insert_reft(graph: fx.Graph, sites: list[Site], targets: dict[str, str]) -> list[fx.Node]:
    """For each ``ffn_out`` site key in ``targets``, route that layer's output through the module."""
    by_key = {s.key: s for s in sites}
    missing = [k for k in targets if k not in by_key]
    if missing:
        raise KeyError(f"sites {missing[:3]} are not in this graph")
    by_name = {n.name for n in graph.nodes}
    added = []
    bounds: dict[fx.Node, fx.Node] = {}  # mask input -> its real_token_bounds, computed once
    for site in sites:  # graph order
        if site.key not in targets:
            continue
        if site.node not in by_name:
            raise KeyError(f"site {site.key!r} is not in this graph")
        out = layer_output(graph, site)
        mask = find_mask(graph, out)
        with graph.inserting_after(out):
            node = graph.call_module(targets[site.key], (out,))
        if mask is not None:
            if mask not in bounds:
                with graph.inserting_before(node):
                    bounds[mask] = graph.call_function(real_token_bounds, (mask,))
                added.append(bounds[mask])
            node.args = (out, bounds[mask])
        out.replace_all_uses_with(node, delete_user_cb=lambda user, new=node: user is not new)
        if "val" in out.meta:
            node.meta["val"] = out.meta["val"]
        node.meta["fxadapt"] = {"adapter": targets[site.key], "site": site.key, "kind": "reft"}
        added.append(node)
    return added
