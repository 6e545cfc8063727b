"""Insert ReFT interventions on the output of transformer layers (the residual stream after each layer).

A layer's output is the node the next layer reads: the residual add of its FFN block (pre-LN:
GPT-2, Llama) or the layer norm after that add (post-LN: BERT, BART). It is found from the layer's
``ffn_out`` projection site with ``passes.bottleneck.find_residual``, so nothing here knows about
model classes. If a bottleneck adapter already replaced that residual step, its node is the layer
output. The intervention node is ``call_module(target, (out,))``; every former reader of ``out``
reads the intervention instead.
"""

from __future__ import annotations

from torch import fx

from .bottleneck import find_residual
from .sites import Site


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
    for site in sites:  # graph order
        if site.key not in targets:
            continue
        if site.node not in by_name:
            raise KeyError(f"site {site.key!r} is not in this graph")
        out = layer_output(graph, site)
        with graph.inserting_after(out):
            node = graph.call_module(targets[site.key], (out,))
        out.replace_all_uses_with(node, delete_user_cb=lambda user, new=node: user is not new)
        if "val" in out.meta:
            node.meta["val"] = out.meta["val"]
        node.meta["fxadapt"] = {"adapter": targets[site.key], "site": site.key, "kind": "reft"}
        added.append(node)
    return added
