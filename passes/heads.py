"""Prediction heads: attach a head module to a graph's outputs, so the head runs in the same graph.

A head is one ``call_module`` node that reads nodes of the graph (the hidden states, the pooled
output, inputs such as the attention mask, labels added as new graph inputs) and returns a dict of
tensors (``logits``, ``loss``, ...), read back with ``getitem`` nodes. The graph's outputs are then
replaced by whatever the caller builds from those nodes. Nothing here knows about model classes or
output types: the caller picks the nodes and rebuilds the output structure.

For several heads over one batch (one per channel of a replicated batch, or per block of rows), the
caller cuts the nodes per head with ``chunk_rows`` or ``slice_rows``, calls ``attach_head`` once
per head and adds their losses with ``sum_of``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten


def graph_inputs(graph: fx.Graph) -> list[fx.Node]:
    """The graph's placeholders, in order."""
    return [n for n in graph.nodes if n.op == "placeholder"]


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def graph_outputs(graph: fx.Graph) -> list[Any]:
    """The flat list of values the graph returns (nodes, or ``None`` for an absent leaf)."""
    value = output_node(graph).args[0]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def set_outputs(graph: fx.Graph, values: Sequence[Any]) -> None:
    """Make the graph return ``values`` (a flat sequence); nodes nothing reads any more become dead."""
    output_node(graph).args = (tuple(values),)


def add_input(graph: fx.Graph, name: str) -> fx.Node:
    """A new placeholder after the last one (its node name may get a suffix if ``name`` is taken)."""
    inputs = graph_inputs(graph)
    if any(n.target == name for n in inputs):
        raise ValueError(f"the graph already has an input named {name!r}")
    where = graph.inserting_after(inputs[-1]) if inputs else graph.inserting_before(None)
    with where:
        return graph.placeholder(name)


def attach_head(
    graph: fx.Graph,
    target: str,
    inputs: dict[str, Any],
    keys: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> dict[str, fx.Node]:
    """Call the head module ``target`` on ``inputs`` (keyword arguments: nodes or constants).

    The call goes just before the graph's output, so every node it reads is defined. Returns one
    ``getitem`` node per key in ``keys`` (the head returns a dict holding at least those keys).
    """
    out = output_node(graph)
    with graph.inserting_before(out):
        call = graph.call_module(target, (), dict(inputs))
        call.meta["fxadapt"] = {"head": target, "kind": "head", **(meta or {})}
        items = {k: graph.call_function(operator.getitem, (call, k)) for k in keys}
    return items


def chunk_rows(graph: fx.Graph, node: fx.Node, n: int) -> list[fx.Node]:
    """``node`` cut along dim 0 into ``n`` equal blocks (one per channel of a batch repeated ``n`` times).

    The cut goes just before the graph's output, where every node is defined, like the heads' calls.
    """
    with graph.inserting_before(output_node(graph)):
        chunks = graph.call_function(aten.chunk.default, (node, n, 0))
        return [graph.call_function(operator.getitem, (chunks, i)) for i in range(n)]


def slice_rows(graph: fx.Graph, node: fx.Node, start: int, end: int) -> fx.Node:
    """Rows ``start:end`` of ``node`` (a block of a batch split into fixed sizes), just before the output."""
    with graph.inserting_before(output_node(graph)):
        return graph.call_function(aten.slice.Tensor, (node, 0, start, end))


def sum_of(graph: fx.Graph, nodes: Sequence[fx.Node]) -> fx.Node:
    """One node holding the sum of scalar ``nodes`` (several heads' losses), just before the output."""
    with graph.inserting_before(output_node(graph)):
        stacked = graph.call_function(aten.stack.default, (list(nodes),))
        return graph.call_function(aten.sum.default, (stacked,))
