"""Prefix tuning: concatenate trained keys and values at every attention op and extend its mask.

For each location (``self``, ``encoder``, ``cross``; see ``passes.attention``) the adapter has one
module, keyed by the location's first k projection site. The pass calls it once,
``kv = module.prefixes(k)`` (every layer's keys and values, batch taken from the first key operand, or
from the block's input where the keys fold the heads into the batch), and at every attention op of
that location ``pk, pv = module(kv, x, position)``: the layer's keys and
values (``[B, P, W]``), or ``None`` for a layer the config leaves out. Then, with plain functions
(graph-independent, so the same code runs eagerly and under ``torch.compile``):

- keys and values: split ``W`` into the operand's heads (``W / head_dim`` kv heads, repeated for
  grouped-query attention exactly as ``repeat_kv`` repeats the real ones), concatenated before the
  real ones along the sequence dim. Keys arrive here after rotary embedding, so the prefix keys are
  not rotated, as in AdapterHub;
- the mask: ``P`` visible columns before the real ones, so every query sees the prefix while
  causality and padding among the real tokens stay as they were. An SDPA op with ``is_causal=True``
  and no mask gets an explicit causal mask with the prefix columns in front.

A location's target is one module or a composition plan (``passes.compose``) over several, or an
AdapterDrop plan around either (no prefix in skipped layers; with the skipped layers as a graph input,
the prefix slots of skipped layers are hidden):

- ``Stack``: the children's prefixes one before another, the last child's first (AdapterHub's
  ``Stack('a', 'b')`` gives keys ``[P_b; P_a; K]``); a child whose config leaves the layer out adds
  nothing there;
- row splits (``BatchSplit``, ``Parallel``): each block of rows gets its child's prefix (its
  ``prefixes`` computed for those rows, its gates reading those rows). Prefixes of different lengths
  are left-padded to the longest with zero keys and values, and a block with no prefix gets only
  padding; the padded slots are *masked* (a ``valid`` ``[B, P]`` flag per slot): in an SDPA mask, in
  the explicit mask that replaces ``is_causal`` or a missing mask, and on the eager scores
  (AdapterHub leaves them visible, a bug);
- per-row routing (``route``): each row gets its adapter's prefix, padded and flagged the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .attention import Attention, attention_layers, find_attention, seq_len_is_one
from .compose import Leaf, Plan, drop_of
from .prefix_compose import Emitter
from .route import keep_valid
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


def _prefix_like(x: torch.Tensor, p: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The prefix in the layout of keys or values ``x``: ``[B, H, P, D]``, or ``[B·H, P, D]`` where the
    model folds the heads into the batch (DeBERTa), ``[B·H, S, D]``."""
    if x.dim() == 3:
        return _heads(p, x.shape[0] // p.shape[0], head_dim).flatten(0, 1).to(x.dtype)
    return _heads(p, x.shape[1], head_dim).to(x.dtype)


def cat_prefix(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Keys or values ``[B, H, S, D]`` (or ``[B·H, S, D]``) with the prefix ``[B, P, W]`` in front."""
    if p is None:
        return x
    return torch.cat([_prefix_like(x, p, x.shape[-1]), x], dim=-2)


def cat_prefix_t(xt: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Transposed keys ``[B, H, D, S]`` (or ``[B·H, D, S]``) with the prefix in front along the last dim."""
    if p is None:
        return xt
    return torch.cat([_prefix_like(xt, p, xt.shape[-2]).transpose(-1, -2), xt], dim=-1)


def pad_mask(
    mask: torch.Tensor,
    p: torch.Tensor | None,
    visible: bool | float | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``P`` columns before the key columns of ``mask``: ``visible`` (default True or 0.0), or per row
    ``valid`` ``[B, P]`` (the slots that are False get False, or the dtype's minimum)."""
    if p is None:
        return mask
    if visible is None:
        visible = True if mask.dtype == torch.bool else 0.0
    if valid is None:
        front = mask.new_full((*mask.shape[:-1], p.shape[1]), visible)
        return torch.cat([front, mask], dim=-1)
    while mask.dim() < 4:  # broadcasting aligns the trailing dims: leading ones keep its meaning
        mask = mask.unsqueeze(0)
    b = valid.shape[0]
    mask = mask.expand(b, *mask.shape[1:])
    hidden = (not visible) if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    flags = valid.reshape(b, *([1] * (mask.dim() - 2)), valid.shape[1]).expand(*mask.shape[:-1], -1)
    front = mask.new_full(flags.shape, hidden).masked_fill(flags, visible)
    return torch.cat([front, mask], dim=-1)


def causal_prefix_mask(
    q: torch.Tensor, k: torch.Tensor, p: torch.Tensor | None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA's ``is_causal=True`` as a boolean mask ``[Sq, P+Sk]`` whose prefix columns are visible
    (``[B, 1, Sq, P+Sk]`` whose prefix columns follow ``valid`` if given)."""
    sq, sk = q.shape[-2], k.shape[-2]
    causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    if p is None:
        return causal
    if valid is None:
        return torch.cat([causal.new_ones(sq, p.shape[1]), causal], dim=-1)
    b = valid.shape[0]
    front = valid[:, None, None, :].expand(b, 1, sq, -1)
    return torch.cat([front, causal.expand(b, 1, sq, sk)], dim=-1)


def prefix_only_mask(
    q: torch.Tensor, k: torch.Tensor, p: torch.Tensor | None, valid: torch.Tensor | None
) -> torch.Tensor | None:
    """For an SDPA op without a mask: ``[B, 1, Sq, P+Sk]`` hiding the padded prefix slots (None if none)."""
    if p is None or valid is None:
        return None
    b, sq, sk = valid.shape[0], q.shape[-2], k.shape[-2]
    front = valid[:, None, None, :].expand(b, 1, sq, -1)
    return torch.cat([front, valid.new_ones(b, 1, sq, sk)], dim=-1)


def mask_scores(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Eager attention's final scores ``[B, H, Sq, P+Sk]`` with the padded prefix slots at the minimum."""
    if valid is None:
        return scores
    b, n = valid.shape
    hidden = (~valid).reshape(b, *([1] * (scores.dim() - 2)), n)
    if scores.dim() == 3:  # [B·H, Sq, P+Sk]
        hidden = hidden.repeat_interleave(scores.shape[0] // b, dim=0)
    front = scores[..., :n].masked_fill(hidden, torch.finfo(scores.dtype).min)
    return torch.cat([front, scores[..., n:]], dim=-1)


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


def _attach_sdpa(
    graph: fx.Graph, att: Attention, pk: fx.Node, pv: fx.Node, valid: fx.Node | None
) -> list[fx.Node]:
    node = att.node
    mask, causal = _sdpa_mask(node)
    added = [graph.call_function(cat_prefix, (att.k, pk)), graph.call_function(cat_prefix, (att.v, pv))]
    args = list(node.args)
    args[1], args[2] = added
    node.args = tuple(args)
    if mask is not None:
        added.append(graph.call_function(pad_mask, (mask, pk, None, valid)))
        _set_arg(node, 3, "attn_mask", added[-1])
    elif causal:
        added.append(graph.call_function(causal_prefix_mask, (att.q, att.k, pk, valid)))
        _set_arg(node, 3, "attn_mask", added[-1])
        _set_arg(node, 5, "is_causal", False)
    elif valid is not None:
        added.append(graph.call_function(prefix_only_mask, (att.q, att.k, pk, valid)))
        _set_arg(node, 3, "attn_mask", added[-1])
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


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)


def with_key_dim(shape: list, x: torch.Tensor) -> list:
    """A view's target shape whose last (key) dim follows ``x``, which now holds the prefix keys too."""
    return [*shape[:-1], x.shape[-1]]


def _lengthen_reshape(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A view of the scores on the way to the softmax (DeBERTa's ``[B·H, S, S] -> [B, H, S, S]``) keeps
    the key dim last; its target shape, recorded for ``S`` keys, is made to follow its input."""
    x, out = node.args[0].meta.get("val"), node.meta.get("val")
    if x is None or out is None or str(x.shape[-1]) != str(out.shape[-1]):
        raise ValueError(
            f"prefix tuning cannot lengthen {node.format_node()}: it does not keep the key dim last"
        )
    with graph.inserting_before(node):
        shape = graph.call_function(with_key_dim, (node.args[1], node.args[0]))
    node.args = (node.args[0], shape, *node.args[2:])
    return shape


_SCALES = (aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar)


def _scaled_key(kt: fx.Node) -> tuple[fx.Node | None, fx.Node]:
    """``(scale op, key)`` where the scores read ``kᵀ / scale`` (DeBERTa), else ``(None, kt)``."""
    if kt.op != "call_function" or kt.target not in _SCALES or len(kt.users) != 1:
        return None, kt
    other = kt.args[1]
    value = other.meta.get("val") if isinstance(other, fx.Node) else None
    if isinstance(other, fx.Node) and (value is None or value.numel() != 1):
        return None, kt
    key = kt.args[0]
    return (kt, key) if isinstance(key, fx.Node) else (None, kt)


def _attach_eager(
    graph: fx.Graph, att: Attention, pk: fx.Node, pv: fx.Node, valid: fx.Node | None
) -> list[fx.Node]:
    scores, context = att.scores, att.context
    if scores.target is aten.baddbmm.default:
        raise ValueError(
            f"prefix tuning cannot attach at {scores.name}: the scores add a bias inside the matmul "
            "(BLOOM's ALiBi, baddbmm), which has no value for prefix positions that is not a guess"
        )
    path = _on_path(scores, att.node)
    scaled, key = _scaled_key(att.k)
    with graph.inserting_before(scaled or scores):
        kt = graph.call_function(cat_prefix_t, (key, pk))
    if scaled is not None:  # the prefix keys are scaled as the real ones are
        scaled.replace_input_with(key, kt)
    else:
        scores.args = (scores.args[0], kt, *scores.args[2:])
    with graph.inserting_before(context):
        v = graph.call_function(cat_prefix, (att.v, pv))
    context.args = (context.args[0], v, *context.args[2:])
    added = [kt, v]
    probs = _on_path(att.node, context)
    for user in [n for n in graph.nodes if n in probs and n is not att.node]:
        if user.target in _RESHAPES:  # the probabilities' views on their way to the values
            added.append(_lengthen_reshape(graph, user))
    for user in [n for n in graph.nodes if n in path and n is not scores]:
        if user.target in _RESHAPES:
            added.append(_lengthen_reshape(graph, user))
            continue
        for index, arg in enumerate(user.args):
            if not isinstance(arg, fx.Node) or arg in path or seq_len_is_one(arg):
                continue
            value = _mask_value(user, index, path)
            with graph.inserting_before(user):
                padded = graph.call_function(pad_mask, (arg, pk, value))
            user.replace_input_with(arg, padded)
            added.append(padded)
    if valid is not None:  # padded slots: hidden on the final scores (after any softcap or mask)
        softmax = att.node
        with graph.inserting_before(softmax):
            masked = graph.call_function(mask_scores, (softmax.args[0], valid))
        softmax.args = (masked, *softmax.args[1:])
        added.append(masked)
    return added


def _folded(k: fx.Node) -> bool:
    """Keys whose heads are folded into the batch (``[B·H, D, S]``, DeBERTa), as the capture recorded them."""
    value = k.meta.get("val")
    return value is not None and value.dim() == 3


def insert_prefix(graph: fx.Graph, sites: list[Site], targets: dict[str, Any]) -> list[fx.Node]:
    """Attach each location's prefix (a module target or a plan, keyed by its first k site) at its attention ops."""
    layers = {layer.key: layer for layer in attention_layers(sites)}
    pools: dict[str, Leaf | Plan] = {}
    for key, target in targets.items():
        layer = layers.get(key)
        if layer is None or layer.position != 0:
            raise KeyError(f"{key!r} is not the first attention layer of a location in this graph")
        pools[layer.location] = Leaf(target) if isinstance(target, str) else target
    added: list[fx.Node] = []
    caches: dict[str, dict[tuple, fx.Node]] = {}
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
        seen.add(att.k_site)
        tree, keep = drop_of(pools[layer.location], layer.layer)
        if tree is None:
            continue  # AdapterDrop: no prefix in this layer
        cache = caches.setdefault(layer.location, {})
        emitter = Emitter(graph, layer.position, {"site": att.k_site, "position": layer.position})
        first = att.node if att.kind == "sdpa" else (_scaled_key(att.k)[0] or att.scores)
        with graph.inserting_before(first):
            x = att.q_input if att.q_input is not None else att.k
            ref = x if _folded(att.k) else att.k  # a tensor whose first dim is the batch
            pk, pv, valid = emitter.emit(tree, cache, None if cache else ref, x)
            added += emitter.added
            if keep is not None:
                valid = graph.call_function(keep_valid, (keep, layer.layer, pk, valid))
                added.append(valid)
            if att.kind == "sdpa":
                added += _attach_sdpa(graph, att, pk, pv, valid)
        if att.kind == "eager":
            added += _attach_eager(graph, att, pk, pv, valid)
    missing = [k for k, layer in layers.items() if layer.location in pools and k not in seen]
    if missing:
        raise ValueError(
            f"no attention op reads the keys of {missing[:3]}: prefix tuning cannot attach there"
        )
    return added
