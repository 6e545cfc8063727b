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

import operator
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
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
from .route import select_rows
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
    outputs = [n for n in graph.nodes if n.meta.get("fxadapt", {}).get("output") and _site_of(n) == site.key]
    if outputs:  # the projection already goes through another adapter (LoRA): start at its output
        cur = outputs[-1]
    for _ in range(_MAX_WALK):
        users = _real_users(cur)
        if len(users) > 1 and (join := _rejoin(cur)) is not None:
            cur = join  # a norm on the block's output (Gemma-2's post-attention/FFN norms)
            continue
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
        if _is_layer_scale(user, cur):
            cur = user  # BEiT's ``lambda * block(x)``: the scale is part of the block AdapterHub adapts
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


def _is_layer_scale(node: fx.Node, cur: fx.Node) -> bool:
    """Whether ``node`` multiplies ``cur`` by a tensor made of parameters only (a layer scale)."""
    if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) != 2:
        return False
    other = node.args[1] if node.args[0] is cur else node.args[0]
    return isinstance(other, fx.Node) and other is not cur and _from_parameters(other)


def _rejoin(start: fx.Node, limit: int = _MAX_WALK * 2) -> fx.Node | None:
    """The first node that every path from ``start`` goes through, if the paths read nothing else.

    A norm applied to a block's output (RMSNorm decomposes into ``pow``, ``mean``, ``rsqrt``, ``mul``)
    fans the projection's output out and joins it again; its other operands are parameters and
    constants. A path that meets another activation (the residual stream) is no such region.
    """
    region = {start}
    node = start.next
    for _ in range(limit):
        if node.op != "call_function":
            return None
        if any(a in region for a in node.all_input_nodes):
            if any(a not in region and not _from_parameters(a) for a in node.all_input_nodes):
                return None
            region.add(node)
            pending = [u for r in region if r is not node for u in _real_users(r) if u not in region]
            if not pending:
                return node if len(region) > 2 else None
        node = node.next
    return None


def _from_parameters(node: fx.Node, limit: int = 16) -> bool:
    """Whether ``node`` is computed from parameters and constants only (no graph input)."""
    queue, seen = deque([node]), {node}
    while queue:
        n = queue.popleft()
        if n.op == "placeholder" or len(seen) > limit:
            return False
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return True


def _site_of(node: fx.Node) -> str | None:
    return node.meta.get("fxadapt", {}).get("site")


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


def residual_step(h: torch.Tensor, r: torch.Tensor, norm: tuple | None) -> torch.Tensor:
    """The block's own residual step with no adapter: ``norm(h + r)`` (post-LN) or ``h + r``."""
    out = h + r
    if norm is None:
        return out
    shape, weight, bias, eps = norm
    return torch.nn.functional.layer_norm(out, shape, weight, bias, eps)


def fusion_stack(*ups: torch.Tensor) -> torch.Tensor:
    """The children's up-projections ``[B, S, H]`` as AdapterFusion's ``[B, S, N, H]``."""
    return torch.stack(ups, dim=2)


def insert_bottleneck(graph: fx.Graph, sites: list[Site], targets: dict[str, Any]) -> list[fx.Node]:
    """Insert the adapter nodes named in ``targets`` (site keys, ``SHARED``, ``INVERTIBLE``).

    A target is one module or a composition plan (``passes.compose``): at each site the pass emits
    AdapterHub's ``bottleneck_layer_forward`` for it, each adapter's ``pre``/``body`` in turn, and
    ``post`` of the last one. Per-row routing runs every routed adapter on all rows and keeps each
    row's own; AdapterDrop as a tensor keeps the plain residual step in skipped layers.
    """
    by_key = {s.key: s for s in sites}
    missing = [k for k in targets if k not in by_key and k not in (SHARED, INVERTIBLE)]
    if missing:
        raise KeyError(f"sites {missing[:3]} are not in this graph")
    added: list[fx.Node] = []
    if INVERTIBLE in targets:
        added += _insert_invertible(graph, sites, _tree(targets[INVERTIBLE]))
    emitter = _Emitter(graph)
    if SHARED in targets:
        for leaf in _leaves(_tree(targets[SHARED])):
            added.append(emitter.shared(leaf.target))
    layers = layer_numbers(sites)
    calls = [call for site in sites if site.key in targets for call in site.each_call()]
    for site in calls:  # graph order: each site sees the rewrites of the ones before it
        tree, keep = drop_of(_tree(targets[site.key]), layers.get(site.key))
        if tree is None:
            continue  # AdapterDrop: this layer runs without adapters
        res = find_residual(graph, site)
        norm = _norm_args(res.norm) if res.norm is not None else None
        replaced = res.norm if res.norm is not None else res.add
        before = set(graph.nodes)
        with graph.inserting_before(replaced.next):
            node = emitter.apply(tree, site.key, res.hidden, res.residual, norm, None)
            if keep is not None:
                plain = graph.call_function(residual_step, (res.hidden, res.residual, norm))
                node = graph.call_function(keep_where, (keep, layers[site.key], node, plain))
        if "val" in replaced.meta:
            node.meta["val"] = replaced.meta["val"]
        replaced.replace_all_uses_with(node)
        for dead in (res.norm, res.add):  # drop now, so that a later pass sees the new structure
            if dead is not None and not dead.users:
                graph.erase_node(dead)
        for new in graph.nodes:
            if new not in before and new.op in ("call_module", "call_method", "call_function"):
                new.meta.setdefault("fxadapt", {"adapter": _target_of(new), "site": site.key, "kind": "part"})
        node.meta["fxadapt"] = {
            "adapter": _target_of(node),
            "site": site.key,
            "kind": "bottleneck",
            "call": site.node,
        }
        added += [n for n in graph.nodes if n not in before]
    return added


def _tree(target: Any) -> Leaf | Plan:
    return Leaf(target) if isinstance(target, str) else target


def _leaves(tree: Leaf | Plan) -> list[Leaf]:
    return [tree] if isinstance(tree, Leaf) else tree.leaves()


def _target_of(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    first = node.args[0] if node.args else None
    return first.target if isinstance(first, fx.Node) and first.op == "get_attr" else ""


class _Emitter:
    """Emits one site's plan: AdapterHub's bottleneck composition, block by block."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.shared_nodes: dict[str, fx.Node] = {}

    def shared(self, target: str) -> fx.Node:
        """The shared-parameter module's output (Compacter), computed once at the graph's entry."""
        if target not in self.shared_nodes:
            last_input = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last_input):
                node = self.graph.call_module(target, ())
            node.meta["fxadapt"] = {"adapter": target, "site": SHARED, "kind": "shared"}
            self.shared_nodes[target] = node
        return self.shared_nodes[target]

    def _shared_of(self, leaf: Leaf) -> fx.Node | None:
        target = leaf.get(SHARED)
        return self.shared_nodes.get(target) if target else None

    def _call(self, leaf: Leaf, method: str, *args: Any) -> fx.Node:
        module = self.graph.get_attr(leaf.target)
        return self.graph.call_method(method, (module, *args))

    def apply(
        self, tree: Leaf | Plan, key: str, h: fx.Node, r: fx.Node, norm: tuple | None, batch: Any
    ) -> fx.Node:
        """The residual step with ``tree``'s adapters: what replaces ``norm(h + r)``."""
        g = self.graph
        if isinstance(tree, Leaf):
            return g.call_module(tree.target, (h, r), {"norm": norm, "shared": self._shared_of(tree)})
        batch = tree.batch if batch is None else batch
        if tree.kind == "route":
            plain = g.call_function(residual_step, (h, r, norm))
            outs = [plain if c is None else self.apply(c, key, h, r, norm, batch) for c in tree.children]
            return g.call_function(select_rows, (tree.index, *outs, plain))
        if tree.kind == "rows":
            parts = []
            for child, (start, stop, rows) in zip(
                tree.children, split_rows(g, tree.sizes, len(tree.children), batch)
            ):
                hi, ri = rows_of(g, h, start, stop, batch), rows_of(g, r, start, stop, batch)
                if child is None:
                    parts.append(g.call_function(residual_step, (hi, ri, norm)))
                else:
                    parts.append(self.apply(child, key, hi, ri, norm, rows))
            return g.call_function(cat_rows, tuple(parts))
        if tree.kind == "split":
            parts, start = [], 0
            for child, size in zip(tree.children, tree.sizes):
                hi, ri = positions_of(g, h, start, start + size), positions_of(g, r, start, start + size)
                if child is None:
                    parts.append(g.call_function(residual_step, (hi, ri, norm)))
                else:
                    parts.append(self.apply(child, key, hi, ri, norm, batch))
                start += size
            return g.call_function(cat_positions, tuple(parts))
        if tree.kind == "sum":
            raise ValueError(
                f"site {key!r}: Sum adds LoRA-like updates (PEFT's several active adapters); bottleneck "
                "adapters compose with Stack, Average, Fuse, Split, BatchSplit or Parallel"
            )
        out = self.body(tree, key, h, r, norm, batch)
        return self._call(tree.last(), "post", out, h, r, norm)

    def body(
        self, tree: Leaf | Plan, key: str, h: fx.Node, r: fx.Node, norm: tuple | None, batch: Any
    ) -> fx.Node:
        """``tree``'s adapters on the hidden state ``h`` without the final residual step (a Stack's inside)."""
        g = self.graph
        if isinstance(tree, Leaf):
            pre = self._call(tree, "pre", h, r, norm)
            x, around = (
                g.call_function(operator.getitem, (pre, 0)),
                g.call_function(operator.getitem, (pre, 1)),
            )
            return self._call(tree, "body", x, around, self._shared_of(tree))
        if tree.kind == "stack":
            for child in tree.children:
                h = self.body(child, key, h, r, norm, batch)
            return h
        if tree.kind == "average":
            outs = [self.body(c, key, h, r, norm, batch) for c in tree.children]
            return g.call_function(weighted_mean, (tree.weights, *outs))
        if tree.kind == "rows":
            parts = []
            for child, (start, stop, rows) in zip(
                tree.children, split_rows(g, tree.sizes, len(tree.children), batch)
            ):
                hi, ri = rows_of(g, h, start, stop, batch), rows_of(g, r, start, stop, batch)
                parts.append(hi if child is None else self.body(child, key, hi, ri, norm, rows))
            return g.call_function(cat_rows, tuple(parts))
        if tree.kind == "split":
            parts, start = [], 0
            for child, size in zip(tree.children, tree.sizes):
                hi, ri = positions_of(g, h, start, start + size), positions_of(g, r, start, start + size)
                parts.append(hi if child is None else self.body(child, key, hi, ri, norm, batch))
                start += size
            return g.call_function(cat_positions, tuple(parts))
        if tree.kind == "fuse":
            return self.fuse(tree, key, h, r, norm, batch)
        raise ValueError(f"site {key!r}: a {tree.kind} block cannot sit there in a bottleneck setup")

    def fuse(self, tree: Plan, key: str, h: fx.Node, r: fx.Node, norm: tuple | None, batch: Any) -> fx.Node:
        """AdapterFusion: the last child's input and residual, the children's up-projections, attention."""
        g = self.graph
        last = tree.last()
        before_ln = bool(tree.option("query_before_ln", False))
        query = self._call(last, "query", h, r, norm, before_ln)
        pre = self._call(last, "pre", h, r, norm)
        x, around = g.call_function(operator.getitem, (pre, 0)), g.call_function(operator.getitem, (pre, 1))
        ups = []
        for child in tree.children:
            if isinstance(child, Leaf):
                ups.append(self._call(child, "up", x, self._shared_of(child)))
                continue
            if not isinstance(child, Plan) or child.kind != "stack":
                raise ValueError(f"site {key!r}: Fuse children are adapter names or Stacks of names")
            state = x  # AdapterHub runs a stacked child on the fused (pre-processed) hidden state
            for leaf in child.children[:-1]:
                state = self.body(leaf, key, state, r, norm, batch)
            inner = self._call(child.children[-1], "pre", state, r, norm)
            ups.append(
                self._call(child.children[-1], "up", g.call_function(operator.getitem, (inner, 0)), None)
            )
        stacked = g.call_function(fusion_stack, tuple(ups))
        return g.call_module(tree.target, (query, stacked, around))


def _insert_invertible(graph: fx.Graph, sites: list[Site], tree: Leaf | Plan) -> list[fx.Node]:
    """The invertible adapters on the embedding output, and their inverses before each LM head.

    A ``Stack`` applies them in order and inverts in reverse order; a row split gives each block of
    rows its own, and so does per-row routing; other blocks have no meaning for an invertible map and
    are refused.
    """
    emb = embedding_output(graph, sites)
    heads = lm_heads(graph, sites)
    before = set(graph.nodes)
    with graph.inserting_before(emb.next):
        fwd = _invertible(graph, tree, emb, False, None)
    emb.replace_all_uses_with(fwd, delete_user_cb=lambda user: user in before and user is not emb)
    fwd.meta["fxadapt"] = {"adapter": _target_of(fwd), "site": INVERTIBLE, "kind": "invertible"}
    if "val" in emb.meta:
        fwd.meta["val"] = emb.meta["val"]
    for head in heads:
        idx = 1 if head.target is aten.addmm.default else 0
        x = head.args[idx]
        with graph.inserting_before(head):
            rev = _invertible(graph, tree, x, True, None)
        head.args = (*head.args[:idx], rev, *head.args[idx + 1 :])
        rev.meta["fxadapt"] = {"adapter": _target_of(rev), "site": INVERTIBLE, "kind": "invertible_rev"}
    return [n for n in graph.nodes if n not in before]


def _invertible(graph: fx.Graph, tree: Leaf | Plan, x: fx.Node, rev: bool, batch: Any) -> fx.Node:
    if isinstance(tree, Leaf):
        return graph.call_module(tree.target, (x,), {"rev": True} if rev else {})
    batch = tree.batch if batch is None else batch
    if tree.kind == "stack":
        for child in reversed(tree.children) if rev else tree.children:
            x = _invertible(graph, child, x, rev, batch)
        return x
    if tree.kind == "route":
        outs = [x if c is None else _invertible(graph, c, x, rev, batch) for c in tree.children]
        return graph.call_function(select_rows, (tree.index, *outs, x))
    if tree.kind == "rows":
        parts = []
        for child, (start, stop, rows) in zip(
            tree.children, split_rows(graph, tree.sizes, len(tree.children), batch)
        ):
            xi = rows_of(graph, x, start, stop, batch)
            parts.append(xi if child is None else _invertible(graph, child, xi, rev, rows))
        return graph.call_function(cat_rows, tuple(parts))
    raise ValueError(
        f"invertible adapters compose with Stack, BatchSplit and Parallel only, not {tree.kind}: "
        "an average or fusion of invertible maps has no inverse"
    )
