"""Attention sites, read off the graph: each attention op with its q/k/v/mask operands and its k projection.

An attention op is either ``aten.scaled_dot_product_attention(q, k, v, mask, ...)`` (SDPA) or an
eager chain ``softmax(f(q @ kᵀ, mask)) @ v``. Each is tied to the projection site whose output
reaches its key operand (``k`` role; GPT-2's fused ``c_attn`` included), which names it, and is
marked *cross* when its key projection reads another tensor than its query projection (an
encoder–decoder's cross-attention).

``attention_layers`` gives the same layers from the site table alone (it is all a method's
``build`` sees), with AdapterHub's location of each: ``self``, ``encoder`` (self-attention of an
encoder whose decoder has cross-attention) or ``cross``. Passes check it against the graph.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import torch
from torch import fx

from .projections import projection_input
from .sites import ATTENTION, MATMULS, SCORES, SOFTMAX, Site

_LIMIT = 400


@dataclass(frozen=True)
class AttentionLayer:
    """One attention block as the site table shows it: its k projection and where AdapterHub puts it."""

    key: str  # the k projection's site key
    location: str  # "self", "encoder" or "cross"
    position: int  # index among the layers of the same location, in graph order
    layer: int  # global layer index (encoder layers first), as AdapterHub's ``leave_out`` counts
    width: int  # key (and value) width: kv heads x head dim
    hidden: int  # width of the block's input


@dataclass
class Attention:
    """One attention op in a graph (nodes, so valid for that graph only)."""

    kind: str  # "sdpa" or "eager"
    node: fx.Node  # the SDPA node, or the softmax of an eager chain
    q: fx.Node
    k: fx.Node  # SDPA: [B, H, S, D]; eager: the transposed key [B, H, D, S]
    v: fx.Node
    k_site: str | None
    q_input: fx.Node | None  # what the query projection reads (the block's hidden states)
    cross: bool
    scores: fx.Node | None = None  # eager: q @ kᵀ
    context: fx.Node | None = None  # eager: probs @ v


def attention_layers(sites: list[Site]) -> list[AttentionLayer]:
    """The attention blocks of a site table, in order, with their AdapterHub location.

    Within one layer the first k projection is self-attention and any later one cross-attention
    (every Hugging Face encoder–decoder runs self- before cross-attention); in a model with
    cross-attention, the self-attention of a stack without it is the encoder's.
    """
    k_sites = [s for s in sites if "k" in s.roles and s.layer is not None]
    per_layer: dict[tuple, list[Site]] = {}
    for s in k_sites:
        per_layer.setdefault((s.stack, s.layer), []).append(s)
    decoders = {stack for (stack, _), members in per_layer.items() if len(members) > 1}
    offsets: dict[str | None, int] = {}
    total = 0
    for s in k_sites:
        if s.stack not in offsets:
            offsets[s.stack] = total
            total += 1 + max(m.layer for m in k_sites if m.stack == s.stack)
    counts: dict[str, int] = {}
    out = []
    for (stack, layer), members in per_layer.items():
        for j, s in enumerate(members):
            if j > 0:
                location = "cross"
            elif decoders and stack not in decoders:
                location = "encoder"
            else:
                location = "self"
            out.append(
                AttentionLayer(
                    key=s.key,
                    location=location,
                    position=counts.get(location, 0),
                    layer=offsets[stack] + layer,
                    width=s.width("k"),
                    hidden=s.in_features,
                )
            )
            counts[location] = counts.get(location, 0) + 1
    return out


def _projection_back(start: fx.Node, by_node: dict[str, Site], role: str) -> Site | None:
    """The nearest projection site with ``role`` that ``start`` derives from.

    The walk goes through another pass's adapter nodes (a LoRA module after the projection).
    """
    seen, queue = {start}, deque([start])
    while queue and len(seen) < _LIMIT:
        node = queue.popleft()
        site = by_node.get(node.name)
        if site is not None and role in site.roles:
            return dataclasses.replace(site, node=node.name)  # the call this attention reads
        adapter = node.op in ("call_module", "call_method") and "fxadapt" in node.meta
        if (node.op != "call_function" and not adapter) or site is not None:
            continue
        if node.target in ATTENTION or node.target in SOFTMAX:
            continue
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return None


def _sdpa_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    return node.args[0], node.args[1], node.args[2]


def _scores_matmul(softmax: fx.Node) -> fx.Node | None:
    """The ``q @ kᵀ`` matmul whose (masked, scaled) result the softmax normalises."""
    seen, queue = set(), deque([softmax.args[0]])
    while queue and len(seen) < _LIMIT:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in SCORES:
            return node
        if node.target in SOFTMAX or node.target in ATTENTION:
            continue
        queue.extend(node.all_input_nodes)
    return None


def _context_matmul(softmax: fx.Node) -> fx.Node | None:
    """The ``probs @ v`` matmul that reads this softmax (through dtype casts and dropout)."""
    seen, queue = set(), deque([softmax])
    while queue and len(seen) < _LIMIT:
        node = queue.popleft()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target in MATMULS:
                return user if user.args[0] is node else None
            if user.target in SOFTMAX or user.target in ATTENTION:
                continue
            queue.append(user)
    return None


def find_attention(graph: fx.Graph, sites: list[Site]) -> list[Attention]:
    """Every attention op of ``graph`` in graph order, each with its key projection site."""
    by_node = {name: s for s in sites for name in s.nodes}
    named = {n.name: n for n in graph.nodes}
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ATTENTION:
            q, k, v = _sdpa_operands(node)
            att = Attention("sdpa", node, q, k, v, None, None, False)
        elif node.target in SOFTMAX:
            scores, context = _scores_matmul(node), _context_matmul(node)
            if scores is None or context is None:
                continue
            q, k = scores_operands(scores)
            att = Attention("eager", node, q, k, context.args[1], None, None, False, scores, context)
        else:
            continue
        k_site = _projection_back(att.k, by_node, "k")
        q_site = _projection_back(att.q, by_node, "q")
        if k_site is None:
            continue
        att.k_site = k_site.key
        k_in = _input_of(named, k_site)
        if q_site is not None:
            att.q_input = _input_of(named, q_site)
            att.cross = q_site.key != k_site.key and att.q_input is not k_in
        found.append(att)
    return found


def _input_of(named: dict[str, fx.Node], site: Site) -> fx.Node | None:
    node = named.get(site.node)
    if node is None or node.op != "call_function":
        return None  # a cached site: the graph reads the projection's output from its cache input
    return projection_input(node)


def scores_operands(scores: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(q, kᵀ) of a scores op: ``matmul(q, kᵀ)``, or BLOOM's ``baddbmm(alibi, q, kᵀ)``."""
    if scores.target is torch.ops.aten.baddbmm.default:
        return scores.args[1], scores.args[2]
    return scores.args[0], scores.args[1]


def seq_len_is_one(node: fx.Node) -> bool:
    """Whether a mask operand's last dim is statically 1 (broadcast over keys: nothing to extend)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    return val.dim() == 0 or (isinstance(val.shape[-1], int) and val.shape[-1] == 1)
