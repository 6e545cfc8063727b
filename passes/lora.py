"""Insert LoRA modules after the projections they adapt: ``y = proj(x)`` becomes ``lora(x, y)``."""

from __future__ import annotations

from torch import fx

from .sites import Site


def insert_lora(graph: fx.Graph, sites: list[Site], targets: dict[str, str]) -> list[fx.Node]:
    """For each site key in ``targets``, route the projection's output through that module."""
    by_name = {n.name: n for n in graph.nodes}
    by_key = {s.key: s for s in sites}
    added = []
    missing = [k for k in targets if k not in by_key]
    if missing:
        raise KeyError(f"sites {missing[:3]} are not in this graph")
    for key, target in targets.items():
        proj = by_name[by_key[key].node]
        x = proj.args[1] if "addmm" in str(proj.target) else proj.args[0]
        src = layer_input(x)
        with graph.inserting_after(proj):
            node = graph.call_module(target, (x, proj) if src is x else (x, proj, src))
        proj.replace_all_uses_with(node, delete_user_cb=lambda user, new=node: user is not new)
        node.meta["fxadapt"] = {"adapter": target, "site": key}
        added.append(node)
    return added


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
