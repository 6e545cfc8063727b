"""Composition at one site: the plan tree a pass expands, and the graph helpers every expansion uses.

The runtime turns an active setup (``Stack``, ``BatchSplit``, ...) into one plan tree per site:
``Leaf`` is one adapter module (its target), ``Plan`` a block over children. A method's pass walks
the tree and emits nodes with its own semantics (LoRA chains low-rank states, bottleneck adapters
chain residual steps); what all of them share is here: slicing rows of the batch and positions of
the sequence, putting the pieces back, weighted means, and replicating the graph's inputs for
``Parallel``. Nothing here knows about adapters' classes or models.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

KINDS = ("stack", "sum", "average", "rows", "split", "fuse", "route", "drop")
ROUTE_INPUT = "fxadapt_adapter_index"  # graph input: each row's adapter (per-row routing)
KEEP_INPUT = "fxadapt_adapter_keep"  # graph input: per layer, whether its adapters run (AdapterDrop)


@dataclass(frozen=True)
class Leaf:
    """One adapter module at this site; ``extra`` holds targets it needs (e.g. shared parameters)."""

    target: str
    extra: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        return dict(self.extra).get(key)


@dataclass(frozen=True)
class Plan:
    """A block over children (``Leaf``, ``Plan`` or ``None``: a row block with no adapter here).

    ``rows``: ``sizes`` rows per child (ints, or ``None`` for ``Parallel``'s equal channels);
    ``split``: ``sizes`` positions per child; ``average``: ``weights``; ``fuse``: ``target`` of the
    fusion module; ``route``: row ``i`` runs child ``index[i]`` (``len(children)``: none), ``index``
    the graph input holding it; ``drop`` (AdapterDrop): its one child, except in the layers
    ``sizes`` (a fixed setting), or where ``index[layer]`` is False (``index``: a graph input, so
    the skipped layers change without a new graph).
    """

    kind: str
    children: tuple[Any, ...]
    sizes: tuple[int, ...] | None = None
    weights: tuple[float, ...] | None = None
    target: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    batch: Any = field(default=None, compare=False)  # the batch size node the top plan splits
    index: Any = field(default=None, compare=False)  # route / drop: the graph input they read

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def leaves(self) -> list[Leaf]:
        out: list[Leaf] = []
        for c in self.children:
            if isinstance(c, Leaf):
                out.append(c)
            elif isinstance(c, Plan):
                out.extend(c.leaves())
        return out

    def last(self) -> Leaf:
        return self.leaves()[-1]


def last_leaf(tree: Leaf | Plan) -> Leaf:
    return tree if isinstance(tree, Leaf) else tree.last()


# ---- functions the emitted nodes call (plain torch, so eager and compiled code are the same) ------


def take_rows(t: torch.Tensor, start: int, stop: int, batch: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a batch of ``batch``; a flattened ``[batch·k, ...]`` tensor gives ``k`` each."""
    k = t.shape[0] // batch
    return t[start * k : stop * k]


def take_positions(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Positions ``[start, stop)`` along the sequence dim (dim 1)."""
    return t[:, start:stop]


def cat_rows(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def cat_positions(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=1)


def weighted_mean(weights: tuple[float, ...], *parts: torch.Tensor) -> torch.Tensor:
    """AdapterHub's output averaging: ``mean_i(w_i · h_i)`` (so ``(1/N) Σ w_i h_i``)."""
    return torch.mean(torch.stack([p * w for p, w in zip(parts, weights)]), dim=0)


def repeat_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` copies of a batch, one after another (channel-major)."""
    return t.repeat(n, *([1] * (t.dim() - 1)))


def keep_where(keep: torch.Tensor, layer: int, out: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """AdapterDrop as a tensor: ``out`` where layer ``layer`` keeps its adapters, else ``original``.

    ``where`` (not a product) so that a skipped layer's output is exactly the original and its
    adapters get exact zero gradients.
    """
    return torch.where(keep[layer], out, original)


# ---- graph helpers -------------------------------------------------------------------------------


def add_input(graph: fx.Graph, name: str) -> fx.Node:
    """A new graph input after the others. It has no ``val``, so no batch logic takes it for a batched input."""
    with graph.inserting_after(_after_placeholders(graph)):
        return graph.placeholder(name)


def layer_numbers(sites: list[Any]) -> dict[str, int]:
    """Each layered site's layer counted over the whole model, encoder layers first (AdapterHub's ``layer_idx``).

    A site's own ``layer`` counts within its stack (an encoder-decoder has two layer 0s); stacks are
    numbered in graph order, as ``passes.attention.attention_layers`` numbers attention layers.
    """
    sizes: dict[Any, int] = {}
    for s in sites:
        if s.layer is not None:
            sizes[s.stack] = max(sizes.get(s.stack, 0), s.layer + 1)
    offsets, total = {}, 0
    for stack, size in sizes.items():
        offsets[stack] = total
        total += size
    return {s.key: offsets[s.stack] + s.layer for s in sites if s.layer is not None}


def drop_of(tree: Any, layer: int | None) -> tuple[Any, fx.Node | None]:
    """What to insert at a site of ``layer`` under AdapterDrop: (the tree or None if skipped, keep input or None).

    A tree that is not a ``drop`` plan comes back as it is; a site outside the layers is never skipped.
    """
    if not isinstance(tree, Plan) or tree.kind != "drop":
        return tree, None
    child = tree.children[0]
    if layer is None:
        return child, None
    if tree.index is None:
        return (None if layer in (tree.sizes or ()) else child), None
    return child, tree.index


def batch_size(graph: fx.Graph) -> fx.Node:
    """A node holding the batch size, read from the first graph input with a batch dim."""
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 1:
            with graph.inserting_after(_after_placeholders(graph)):
                size = graph.call_function(torch.ops.aten.sym_size.int, (node, 0))
            size.meta["val"] = val.shape[0]
            return size
    raise ValueError("the graph has no tensor input with a batch dim")


def _after_placeholders(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def replicate_inputs(graph: fx.Graph, channels: int) -> fx.Node:
    """Repeat every batched graph input ``channels`` times (``Parallel``); returns the original batch size.

    Every node downstream reads the repeated inputs, so shapes computed from them (``sym_size``,
    masks, positions) follow the new batch ``channels·B`` by themselves.
    """
    batch = batch_size(graph)
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        with graph.inserting_before(batch.next):
            rep = graph.call_function(repeat_batch, (node, channels))
        node.replace_all_uses_with(rep, delete_user_cb=lambda user, keep=(rep, batch): user not in keep)
    return batch


def graph_input(node: fx.Node) -> fx.Node:
    """What the graph reads for input ``node``: its repeated copy once ``Parallel`` replicated it, else itself.

    A pass that reads a graph input (an attention mask) after ``replicate_inputs`` must read the copy,
    which has the ``channels·B`` rows every other tensor has.
    """
    for user in node.users:
        if user.op == "call_function" and user.target is repeat_batch:
            return user
    return node


def split_rows(
    graph: fx.Graph, sizes: tuple[int, ...] | None, n: int, batch: Any
) -> list[tuple[Any, Any, Any]]:
    """``(start, stop, rows)`` of each child: static ``sizes``, or ``n`` equal channels of ``batch``.

    Nodes (for symbolic bounds) are made at the graph's current insertion point.
    """
    if sizes is not None:
        out, start = [], 0
        for s in sizes:
            out.append((start, start + s, s))
            start += s
        return out
    channel = graph.call_function(operator.floordiv, (batch, n))
    bounds = [0, channel] + [graph.call_function(operator.mul, (i, channel)) for i in range(2, n + 1)]
    return [(bounds[i], bounds[i + 1], channel) for i in range(n)]


def rows_of(graph: fx.Graph, node: fx.Node | None, start: Any, stop: Any, batch: Any) -> fx.Node | None:
    if node is None:
        return None
    return graph.call_function(take_rows, (node, start, stop, batch))


def positions_of(graph: fx.Graph, node: fx.Node | None, start: int, stop: int) -> fx.Node | None:
    if node is None:
        return None
    return graph.call_function(take_positions, (node, start, stop))


def scaled_batch(graph: fx.Graph, batch: fx.Node, channels: int) -> Any:
    """The batch after ``Parallel`` replicated it: ``channels·B`` (``B`` itself for one channel)."""
    if channels == 1:
        return batch
    with graph.inserting_after(batch):
        return graph.call_function(operator.mul, (channels, batch))
