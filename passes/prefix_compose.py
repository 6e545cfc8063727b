"""Composed prefixes at one attention location: a ``Stack`` concatenates them, row splits pad and flag them.

``emit`` walks a location's plan (``passes.compose``) at one attention op and returns three nodes:
the prefix keys and values ``[B, P, W]`` and ``valid`` ``[B, P]`` (``True`` where a slot holds a real
prefix position), or ``None`` for ``valid`` where no slot can be padding (a ``Stack`` of plain
adapters). Each leaf's ``prefixes`` is computed once per location (at its first attention op) for
the rows of its block; its gates read those rows of the layer's input at every op. The functions the
emitted nodes call are plain torch, so eager and compiled code are the same.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .compose import Leaf, Plan, rows_of, split_rows
from .route import route_prefix

Prefix = tuple[Any, Any, Any]  # (keys [B, P, W] or None, values, valid [B, P] bool or None)


def _valid(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is not None:
        return valid
    return torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)


def stack_prefix(parts: tuple[Prefix, ...]) -> Prefix:
    """A Stack's prefix: the last child's first (``[P_b; P_a]``); a child left out of the layer adds nothing."""
    present = [p for p in reversed(parts) if p[0] is not None]
    if not present:
        return None, None, None
    if len(present) == 1:
        return present[0]
    keys = torch.cat([p[0] for p in present], dim=1)
    values = torch.cat([p[1] for p in present], dim=1)
    if all(p[2] is None for p in present):
        return keys, values, None
    return keys, values, torch.cat([_valid(p[0], p[2]) for p in present], dim=1)


def rows_prefix(parts: tuple[tuple[Prefix, Any], ...]) -> Prefix:
    """Row blocks' prefixes (each with its row count) as one batch, left-padded to the longest.

    Padding slots have zero keys and values and ``valid`` False; a block without a prefix (no
    adapter, or one that leaves the layer out) is all padding. Equal lengths give ``valid`` None.
    """
    present = [p for p, _ in parts if p[0] is not None]
    if not present:
        return None, None, None
    longest = max(p[0].shape[1] for p in present)
    if all(p[0] is not None and p[2] is None and p[0].shape[1] == longest for p, _ in parts):
        return torch.cat([p[0] for p, _ in parts]), torch.cat([p[1] for p, _ in parts]), None
    ref = present[0][0]
    keys, values, valid = [], [], []
    for (k, v, ok), rows in parts:
        if k is None:
            pad = ref.new_zeros(rows, longest, ref.shape[-1])
            keys.append(pad)
            values.append(pad)
            valid.append(torch.zeros(rows, longest, dtype=torch.bool, device=ref.device))
            continue
        n = longest - k.shape[1]
        pad = k.new_zeros(k.shape[0], n, k.shape[-1])
        keys.append(torch.cat([pad, k], dim=1))
        values.append(torch.cat([pad.to(v.dtype), v], dim=1))
        flags = torch.zeros(k.shape[0], n, dtype=torch.bool, device=k.device)
        valid.append(torch.cat([flags, _valid(k, ok)], dim=1))
    return torch.cat(keys), torch.cat(values), torch.cat(valid)


class Emitter:
    """Emits one location's plan at its attention ops; ``cache`` keeps each leaf's ``prefixes`` node."""

    def __init__(self, graph: fx.Graph, position: int, meta: dict[str, Any]) -> None:
        self.graph = graph
        self.position = position
        self.meta = meta
        self.added: list[fx.Node] = []

    def emit(
        self, tree: Leaf | Plan, cache: dict[tuple, fx.Node], ref: fx.Node | None, x: fx.Node
    ) -> tuple[fx.Node, fx.Node, fx.Node | None]:
        """``(keys, values, valid)`` nodes; ``ref`` (a tensor with the batch rows) when ``cache`` is empty."""
        return self._emit(tree, (), cache, ref, x, None)

    def _out(self, node: fx.Node, n: int) -> list[fx.Node]:
        out = [self.graph.call_function(operator.getitem, (node, i)) for i in range(n)]
        self.added += [node, *out]
        return out

    def _emit(self, tree, path: tuple, cache: dict, ref, x, batch) -> tuple:
        g = self.graph
        if isinstance(tree, Leaf):
            if path not in cache:
                module = g.get_attr(tree.target)
                cache[path] = g.call_method("prefixes", (module, ref))
                self.added += [module, cache[path]]
            pair = g.call_module(tree.target, (cache[path], x, self.position))
            pair.meta["fxadapt"] = {**self.meta, "adapter": tree.target}
            return (*self._out(pair, 2), None)
        batch = tree.batch if batch is None else batch
        if tree.kind == "stack":
            parts = [self._emit(c, (*path, i), cache, ref, x, batch) for i, c in enumerate(tree.children)]
            keys, values, valid = self._out(g.call_function(stack_prefix, (tuple(parts),)), 3)
            return keys, values, valid if any(p[2] is not None for p in parts) else None
        if tree.kind == "rows":
            parts = []
            bounds = split_rows(g, tree.sizes, len(tree.children), batch)
            for i, (child, (start, stop, rows)) in enumerate(zip(tree.children, bounds)):
                if child is None:
                    parts.append(((None, None, None), rows))
                    continue
                ref_i = rows_of(g, ref, start, stop, batch)
                x_i = rows_of(g, x, start, stop, batch)
                self.added += [n for n in (ref_i, x_i) if n is not None]
                parts.append((self._emit(child, (*path, i), cache, ref_i, x_i, rows), rows))
            return tuple(self._out(g.call_function(rows_prefix, (tuple(parts),)), 3))
        if tree.kind == "route" and not any(isinstance(c, Plan) for c in tree.children):
            pairs: list[Any] = []
            for i, child in enumerate(tree.children):
                if child is None:
                    pairs += [None, None]
                    continue
                pairs += list(self._emit(child, (*path, i), cache, ref, x, batch)[:2])
            return tuple(self._out(g.call_function(route_prefix, (tree.index, *pairs)), 3))
        raise ValueError(
            f"prefix tuning composes with Stack, BatchSplit, Parallel and per-row routing only, not {tree.kind}: a prefix is "
            "a set of extra keys and values, which cannot be averaged, fused or split along the sequence"
        )
