"""Activation checkpointing as a graph transform: each layer's nodes become one recomputed sub-graph.

Nodes are grouped by the layer that produced them (the module path ending in a layer index, such as
``encoder.layer.3``, read off ``meta["nn_module_stack"]``; nodes a pass inserted without that meta,
such as adapter calls, belong to the layer of the node they read). Each maximal run of one layer's
nodes moves into its own ``GraphModule`` (over the same parameters), called through
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: its activations are freed after the
forward and recomputed in the backward, with the same random numbers (dropout). What the run reads
from outside (the previous layer's output, the mask, sizes) becomes its inputs; what later nodes read
becomes its outputs. Parameters are read inside the run, so nothing is copied.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

_LAYER = re.compile(r"^(.*\.\d+)$")


class Checkpointed(nn.Module):
    """Runs ``region`` under non-reentrant activation checkpointing (saved inputs on the host if ``offload``)."""

    def __init__(self, region: fx.GraphModule, offload: bool = False) -> None:
        super().__init__()
        self.region = region
        self.offload = offload

    def forward(self, *args):
        if self.offload:
            with save_on_cpu(pin_memory=torch.cuda.is_available()):
                return checkpoint(self.region, *args, use_reentrant=False)
        return checkpoint(self.region, *args, use_reentrant=False)


def layer_path(node: fx.Node) -> str | None:
    """The outermost module path in the node's stack that ends in an index (``m.encoder.layer.3``)."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if _LAYER.match(path):
            return path
    return None


def _labels(graph: fx.Graph) -> dict[fx.Node, str | None]:
    labels: dict[fx.Node, str | None] = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if "nn_module_stack" in node.meta:
            labels[node] = layer_path(node)
        elif (node.meta.get("fxadapt") or {}).get("kind") == "head":
            labels[node] = None
        else:  # inserted by a pass: the layer of the latest node it reads (an adapter's projection output)
            inputs = [a for a in node.all_input_nodes if a in labels]
            labels[node] = labels[max(inputs, key=order.__getitem__)] if inputs else None
    return labels


def layer_runs(graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """Maximal runs of consecutive nodes of one layer (placeholders and get_attr nodes do not break a run)."""
    runs: list[tuple[str | None, list[fx.Node]]] = []
    for node, label in _labels(graph).items():
        if runs and runs[-1][0] == label:
            runs[-1][1].append(node)
        else:
            runs.append((label, [node]))
    return [(label, nodes) for label, nodes in runs if label is not None]


def checkpoint_layers(
    gm: fx.GraphModule, keep: Callable[[str], bool] = lambda path: True, offload: bool = False
) -> int:
    """Move each layer run whose path ``keep`` accepts into a checkpointed sub-module; returns how many."""
    count = 0
    for path, run in layer_runs(gm.graph):
        if len(run) >= 2 and keep(path) and _move(gm, path, run, f"checkpointed_{count}", offload):
            count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


def _move(gm: fx.GraphModule, path: str, run: list[fx.Node], name: str, offload: bool) -> bool:
    """Replace ``run`` by a call of a new checkpointed sub-module ``name`` (False if nothing reads the run)."""
    graph = gm.graph
    members = set(run)
    inputs: list[fx.Node] = []
    for node in run:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in run if any(u not in members for u in n.users)]
    if not outputs:
        return False
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: sub.placeholder(a.name) for a in inputs}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # a parameter read: read it inside the region too
            env[n] = sub.get_attr(n.target)
        return env[n]

    for node in run:
        env[node] = sub.node_copy(node, lookup)
    sub.output(tuple(env[o] for o in outputs))
    gm.add_submodule(name, Checkpointed(fx.GraphModule(gm, sub, class_name="CheckpointedLayer"), offload))
    with graph.inserting_before(run[0]):
        call = graph.call_module(name, tuple(inputs))
        call.meta["fxadapt"] = {"kind": "checkpoint", "layer": path}
        values = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for out, value in zip(outputs, values):
        out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in members)
    for node in reversed(run):
        graph.erase_node(node)
    return True
