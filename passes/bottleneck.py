"""Insert bottleneck adapters at the residual connections, and invertible adapters at the embeddings.

A bottleneck adapter belongs to a residual connection: the attention block's (its ``o`` projection
feeds it) or the FFN's (its ``ffn_out`` projection feeds it). From the projection the pass walks
forward through views, dropout and other adapters' nodes to the residual ``add``; what reaches the
add is the block output ``h``, the add's other operand is the residual input ``r``. The block is
*post-LN* (BERT, BART: ``LayerNorm(h + r)``) when the add's only reader is a ``layer_norm`` and the
residual stream ``r`` feeds projections directly; it is *pre-LN* (GPT-2, Llama: ``r + h``) otherwise.

The adapter node is ``call_module(target, (h, r), {"norm": norm, "shared": shared})`` where ``norm``
is ``(normalized_shape, weight, bias, eps)`` of the post-LN layer norm (``None`` for pre-LN) and
``shared`` is the output of the adapter's shared-parameter module (``None`` without one). The node
replaces the layer norm (post-LN) or the add (pre-LN): the module computes the whole residual
step, as AdapterHub's ``bottleneck_layer_forward`` does, and the original add/norm become dead.

Two keys in ``targets`` are not projection sites: ``SHARED`` (a module called once, without
inputs, whose output every adapter node receives) and ``INVERTIBLE`` (called on the embedding output,
the residual input of the first layer's attention block, and with ``rev=True`` on the input of each
output projection whose weight has the shape of the input embedding table, i.e. an LM head).
Nothing here knows about model classes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import fx

from .sites import PROJECTIONS, Site

aten = torch.ops.aten

SHARED = "shared_parameters"
INVERTIBLE = "invertible_adapters"

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_PASS_THROUGH = _VIEWS | {
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
}
_SIDE = {aten._assert_tensor_metadata.default, aten.sym_size.int}
_MAX_WALK = 32


@dataclass
class Residual:
    """The residual step a site's projection feeds: ``add(h, r)``, then ``norm`` if post-LN."""

    site: str
    hidden: fx.Node
    residual: fx.Node
    add: fx.Node
    norm: fx.Node | None


def _real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _SIDE)]


def _is_adapter(node: fx.Node) -> bool:
    return node.op == "call_module" and "fxadapt" in node.meta


def find_residual(graph: fx.Graph, site: Site) -> Residual:
    """Walk from ``site``'s projection to its residual add (and the layer norm after it, if post-LN)."""
    by_name = {n.name: n for n in graph.nodes}
    if site.node not in by_name:
        raise KeyError(f"site {site.key!r} is not in this graph")
    cur = by_name[site.node]
    for _ in range(_MAX_WALK):
        users = _real_users(cur)
        if len(users) != 1:
            raise ValueError(
                f"site {site.key!r}: the projection's output is read by {len(users)} nodes before any "
                "residual add; a bottleneck adapter needs `residual + block(x)` after it"
            )
        user = users[0]
        if user.op == "call_function" and user.target is aten.add.Tensor:
            break
        if _is_adapter(user) and user.meta["fxadapt"].get("kind") == "bottleneck":
            raise ValueError(
                f"site {site.key!r} already has a bottleneck adapter of another active adapter; "
                "stacking two bottleneck adapters at one site is not supported"
            )
        if _is_adapter(user) and len(user.args) > 1 and user.args[1] is cur:
            cur = user  # another adapter's node that rewrites the projection's output (LoRA)
            continue
        if user.op == "call_function" and user.target in _PASS_THROUGH and user.args[0] is cur:
            cur = user
            continue
        raise ValueError(
            f"site {site.key!r}: the projection's output goes through {user.format_node()!r} before any "
            "residual add; a bottleneck adapter needs `residual + block(x)` after it"
        )
    else:
        raise ValueError(f"site {site.key!r}: no residual add within {_MAX_WALK} nodes of the projection")
    add = user
    alpha = add.kwargs.get("alpha", 1)
    others = [a for a in add.args[:2] if a is not cur]
    if alpha != 1 or len(others) != 1 or not isinstance(others[0], fx.Node):
        raise ValueError(f"site {site.key!r}: {add.format_node()!r} is not a plain residual add")
    residual = others[0]
    norm = None
    after = _real_users(add)
    if (
        len(after) == 1
        and after[0].op == "call_function"
        and after[0].target is aten.layer_norm.default
        and after[0].args[0] is add
        and _feeds_projection(residual)
    ):
        norm = after[0]
    return Residual(site.key, cur, residual, add, norm)


def _feeds_projection(node: fx.Node) -> bool:
    """Whether ``node`` is read (through views only) as the input of a projection: a post-LN stream."""
    queue, seen = deque([node]), {node}
    while queue:
        n = queue.popleft()
        for user in n.users:
            if user.op != "call_function":
                continue
            if user.target in PROJECTIONS:
                x = user.args[1] if user.target is aten.addmm.default else user.args[0]
                if x is n:
                    return True
            elif user.target in _VIEWS and user not in seen:
                seen.add(user)
                queue.append(user)
    return False


def _norm_args(norm: fx.Node) -> tuple:
    """``(normalized_shape, weight, bias, eps)`` of an ``aten.layer_norm`` node."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}
    values = dict(zip(names, norm.args))
    for k in names:
        if k not in values:
            values[k] = norm.kwargs.get(k, defaults.get(k))
    return (list(values["normalized_shape"]), values["weight"], values["bias"], float(values["eps"]))


def embedding_output(graph: fx.Graph, sites: list[Site]) -> fx.Node:
    """The embedding output: the residual input of the first layer's attention block."""
    first = next((s for s in sites if s.layer is not None and "o" in s.roles), None)
    if first is None:
        raise ValueError("no attention output projection: cannot locate the embedding output")
    return find_residual(graph, first).residual


def lm_heads(graph: fx.Graph, sites: list[Site]) -> list[fx.Node]:
    """Projections outside the layers whose weight is (or has the shape of) the input embedding table.

    The input embedding is the first ``aten.embedding`` whose indices are a graph input (the token
    ids; type or position ids given as inputs come later).
    """
    by_name = {n.name: n for n in graph.nodes}
    table = None
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            idx, w = node.args[1], node.args[0]
            while isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target in _VIEWS:
                idx = idx.args[0]
            if isinstance(idx, fx.Node) and idx.op == "placeholder" and isinstance(w, fx.Node):
                table = w
                break
    if table is None or table.op != "get_attr":
        return []
    val = table.meta.get("val")
    shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    return [
        by_name[s.node]
        for s in sites
        if s.layer is None
        and s.node in by_name
        and (s.weight == table.target or (shape is not None and (s.out_features, s.in_features) == shape))
    ]


def insert_bottleneck(graph: fx.Graph, sites: list[Site], targets: dict[str, str]) -> list[fx.Node]:
    """Insert the adapter nodes named in ``targets`` (site keys, ``SHARED``, ``INVERTIBLE``)."""
    by_key = {s.key: s for s in sites}
    missing = [k for k in targets if k not in by_key and k not in (SHARED, INVERTIBLE)]
    if missing:
        raise KeyError(f"sites {missing[:3]} are not in this graph")
    added: list[fx.Node] = []
    if INVERTIBLE in targets:
        added += _insert_invertible(graph, sites, targets[INVERTIBLE])
    shared = None
    if SHARED in targets:
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_input):
            shared = graph.call_module(targets[SHARED], ())
        shared.meta["fxadapt"] = {"adapter": targets[SHARED], "site": SHARED, "kind": "shared"}
        added.append(shared)
    for site in sites:  # graph order: each site sees the rewrites of the ones before it
        if site.key not in targets:
            continue
        res = find_residual(graph, site)
        norm = _norm_args(res.norm) if res.norm is not None else None
        replaced = res.norm if res.norm is not None else res.add
        with graph.inserting_after(replaced):
            node = graph.call_module(
                targets[site.key], (res.hidden, res.residual), {"norm": norm, "shared": shared}
            )
        if "val" in replaced.meta:
            node.meta["val"] = replaced.meta["val"]
        replaced.replace_all_uses_with(node)
        for dead in (res.norm, res.add):  # drop now, so that a later pass sees the new structure
            if dead is not None and not dead.users:
                graph.erase_node(dead)
        node.meta["fxadapt"] = {"adapter": targets[site.key], "site": site.key, "kind": "bottleneck"}
        added.append(node)
    return added


def _insert_invertible(graph: fx.Graph, sites: list[Site], target: str) -> list[fx.Node]:
    emb = embedding_output(graph, sites)
    heads = lm_heads(graph, sites)
    with graph.inserting_after(emb):
        fwd = graph.call_module(target, (emb,))
    emb.replace_all_uses_with(fwd, delete_user_cb=lambda user: user is not fwd)
    fwd.meta["fxadapt"] = {"adapter": target, "site": INVERTIBLE, "kind": "invertible"}
    if "val" in emb.meta:
        fwd.meta["val"] = emb.meta["val"]
    added = [fwd]
    for head in heads:
        idx = 1 if head.target is aten.addmm.default else 0
        x = head.args[idx]
        with graph.inserting_before(head):
            rev = graph.call_module(target, (x,), {"rev": True})
        head.args = (*head.args[:idx], rev, *head.args[idx + 1 :])
        rev.meta["fxadapt"] = {"adapter": target, "site": INVERTIBLE, "kind": "invertible_rev"}
        added.append(rev)
    return added
