"""Prefix tuning: concatenate trained keys and values at every attention op and extend its mask.

For each location (``self``, ``encoder``, ``cross``; see ``passes.attention``) the adapter has one
module, keyed by the location's first k projection site. The pass calls it once,
``kv = module.prefixes(k)`` (``[B, P, 2·layers, W]``, batch taken from the first key operand), and
at every attention op of that location ``pk, pv = module(kv, x, position)``: the layer's keys and
values (``[B, P, W]``), or ``None`` for a layer the config leaves out. Then, with plain functions
(graph-independent, so the same code runs eagerly and under ``torch.compile``):

- keys and values: split ``W`` into the operand's heads (``W / head_dim`` kv heads, repeated for
  grouped-query attention exactly as ``repeat_kv`` repeats the real ones), concatenated before the
  real ones along the sequence dim. Keys arrive here after rotary embedding, so the prefix keys are
  not rotated, as in AdapterHub;
- the mask: ``P`` visible columns before the real ones, so every query sees the prefix while
  causality and padding among the real tokens stay as they were. An SDPA op with ``is_causal=True``
  and no mask gets an explicit causal mask with the prefix columns in front.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .attention import Attention, attention_layers, find_attention, seq_len_is_one
from .sites import Site

aten = torch.ops.aten


def _heads(p: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``[B, P, W]`` -> ``[B, heads, P, head_dim]``, repeating kv heads for grouped-query attention."""
    b, n = p.shape[0], p.shape[1]
    kv_heads = p.shape[-1] // head_dim
    out = p.reshape(b, n, kv_heads, head_dim).transpose(1, 2)
    if heads != kv_heads:
        out = out.repeat_interleave(heads // kv_heads, dim=1)
    return out


def cat_prefix(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Keys or values ``[B, H, S, D]`` with the prefix ``[B, P, W]`` in front: ``[B, H, P+S, D]``."""
    if p is None:
        return x
    return torch.cat([_heads(p, x.shape[1], x.shape[-1]).to(x.dtype), x], dim=-2)


def cat_prefix_t(xt: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Transposed keys ``[B, H, D, S]`` with the prefix in front: ``[B, H, D, P+S]``."""
    if p is None:
        return xt
    heads = _heads(p, xt.shape[1], xt.shape[-2]).to(xt.dtype)
    return torch.cat([heads.transpose(-1, -2), xt], dim=-1)


def pad_mask(mask: torch.Tensor, p: torch.Tensor | None, visible: bool | float | None = None) -> torch.Tensor:
    """``P`` columns of ``visible`` before the key columns of ``mask`` (default: True or 0.0)."""
    if p is None:
        return mask
    if visible is None:
        visible = True if mask.dtype == torch.bool else 0.0
    front = mask.new_full((*mask.shape[:-1], p.shape[1]), visible)
    return torch.cat([front, mask], dim=-1)


def causal_prefix_mask(q: torch.Tensor, k: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """SDPA's ``is_causal=True`` as a boolean mask ``[Sq, P+Sk]`` whose prefix columns are all visible."""
    sq, sk = q.shape[-2], k.shape[-2]
    causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    if p is None:
        return causal
    return torch.cat([causal.new_ones(sq, p.shape[1]), causal], dim=-1)


def _sdpa_mask(node: fx.Node) -> tuple[fx.Node | None, bool]:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    return mask, bool(causal)


def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _attach_sdpa(graph: fx.Graph, att: Attention, pk: fx.Node, pv: fx.Node) -> list[fx.Node]:
    node = att.node
    mask, causal = _sdpa_mask(node)
    added = [graph.call_function(cat_prefix, (att.k, pk)), graph.call_function(cat_prefix, (att.v, pv))]
    args = list(node.args)
    args[1], args[2] = added
    node.args = tuple(args)
    if mask is not None:
        added.append(graph.call_function(pad_mask, (mask, pk)))
        _set_arg(node, 3, "attn_mask", added[-1])
    elif causal:
        added.append(graph.call_function(causal_prefix_mask, (att.q, att.k, pk)))
        _set_arg(node, 3, "attn_mask", added[-1])
        _set_arg(node, 5, "is_causal", False)
    return added


def _on_path(scores: fx.Node, softmax: fx.Node) -> set[fx.Node]:
    """Nodes on a path from the scores matmul to the softmax (the scores' elementwise chain)."""
    memo: dict[fx.Node, bool] = {scores: True}

    def reaches(node: fx.Node, depth: int = 0) -> bool:
        if node in memo:
            return memo[node]
        memo[node] = False
        if node.op == "call_function" and depth < 64:
            memo[node] = any([reaches(a, depth + 1) for a in node.all_input_nodes])
        return memo[node]

    reaches(softmax)
    return {n for n, on in memo.items() if on} - {softmax}


def _mask_value(user: fx.Node, index: int, path: set[fx.Node]) -> bool | float:
    """The value that marks a prefix column visible in operand ``index`` of ``user``."""
    target = user.target
    if target in (aten.add.Tensor, aten.sub.Tensor):
        return 0.0
    if target is aten.where.self and index == 0:
        return user.args[1] in path
    if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and index == 1:
        return False
    raise ValueError(
        f"prefix tuning cannot extend operand {index} of {user.format_node()} to the prefix keys"
    )


def _attach_eager(graph: fx.Graph, att: Attention, pk: fx.Node, pv: fx.Node) -> list[fx.Node]:
    scores, context = att.scores, att.context
    path = _on_path(scores, att.node)
    with graph.inserting_before(scores):
        kt = graph.call_function(cat_prefix_t, (att.k, pk))
    scores.args = (scores.args[0], kt, *scores.args[2:])
    with graph.inserting_before(context):
        v = graph.call_function(cat_prefix, (att.v, pv))
    context.args = (context.args[0], v, *context.args[2:])
    added = [kt, v]
    for user in [n for n in graph.nodes if n in path and n is not scores]:
        for index, arg in enumerate(user.args):
            if not isinstance(arg, fx.Node) or arg in path or seq_len_is_one(arg):
                continue
            value = _mask_value(user, index, path)
            with graph.inserting_before(user):
                padded = graph.call_function(pad_mask, (arg, pk, value))
            user.replace_input_with(arg, padded)
            added.append(padded)
    return added


def insert_prefix(graph: fx.Graph, sites: list[Site], targets: dict[str, str]) -> list[fx.Node]:
    """Attach each location's prefix (module target keyed by its first k site) at its attention ops."""
    layers = {layer.key: layer for layer in attention_layers(sites)}
    pools: dict[str, str] = {}
    for key, target in targets.items():
        layer = layers.get(key)
        if layer is None or layer.position != 0:
            raise KeyError(f"{key!r} is not the first attention layer of a location in this graph")
        pools[layer.location] = target
    added: list[fx.Node] = []
    kv: dict[str, fx.Node] = {}
    seen: set[str] = set()
    for att in find_attention(graph, sites):
        layer = layers.get(att.k_site)
        if layer is None or layer.location not in pools:
            continue
        if att.cross != (layer.location == "cross"):
            raise ValueError(
                f"attention at {att.node.name} reads k from {att.k_site}, which the site table places in "
                f"'{layer.location}' but the graph shows as {'cross' if att.cross else 'self'}-attention"
            )
        target = pools[layer.location]
        first = att.node if att.kind == "sdpa" else att.scores
        with graph.inserting_before(first):
            if layer.location not in kv:
                module = graph.get_attr(target)
                kv[layer.location] = graph.call_method("prefixes", (module, att.k))
                added += [module, kv[layer.location]]
            x = att.q_input if att.q_input is not None else att.k
            pair = graph.call_module(target, (kv[layer.location], x, layer.position))
            pk = graph.call_function(operator.getitem, (pair, 0))
            pv = graph.call_function(operator.getitem, (pair, 1))
            added += [pair, pk, pv]
            if att.kind == "sdpa":
                added += _attach_sdpa(graph, att, pk, pv)
        if att.kind == "eager":
            added += _attach_eager(graph, att, pk, pv)
        pair.meta["fxadapt"] = {"adapter": target, "site": att.k_site, "position": layer.position}
        seen.add(att.k_site)
    missing = [k for k, layer in layers.items() if layer.location in pools and k not in seen]
    if missing:
        raise ValueError(
            f"no attention op reads the keys of {missing[:3]}: prefix tuning cannot attach there"
        )
    return added
