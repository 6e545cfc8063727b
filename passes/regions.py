"""Regional compilation as a graph transform: identical layers share one compiled sub-graph.

A transformer's layers are the same graph over different weights. Compiling the captured graph whole
makes the compiler trace and generate code for every layer; this pass instead moves each layer's run
of nodes (``passes.checkpoint.layer_runs``) into a sub-graph whose weights and adapter modules are
read from the sub-module that runs it under canonical names (``a0``, ``a1``, ...). Runs with the same
structure and the same weight shapes get the same generated ``forward`` function, so one compiled
function serves all of them, as PyTorch's regional compilation recipe does for identical eager
modules: the compiler sees each distinct layer shape once. The nodes outside the layers (embeddings,
heads, the glue between layers) stay in the top graph and run eagerly.

Whether a layer's inputs carry gradients is part of its shape (the backward differs): BERT's first
layer reads the frozen embeddings. A layer that differs from a shared shape only in that runs the
shared compiled code with those inputs made to require a gradient (``needs_grad``): the input
gradient it computes and drops costs far less than compiling a second backward. Any other shape that
only one layer has runs eagerly when other shapes are compiled: compiling it would cost as much
start-up time as all the other layers together, for one layer's share of a step.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .checkpoint import layer_runs


class RegionBody(nn.Module):
    """Holds one layer's weights and adapter modules under the canonical names its template reads."""


class Region(nn.Module):
    """Runs a layer's body through its template's (compiled) function."""

    def __init__(self, body: RegionBody, run: Callable[..., Any], shape: int) -> None:
        super().__init__()
        self.body = body
        self.run = run
        self.shape = shape

    def forward(self, *args: Any) -> Any:
        return self.run(self.body, *args)


@dataclass
class RegionReport:
    """What ``regionalize`` did: layer runs made regions, their distinct shapes, and how many compiled."""

    regions: int
    shapes: int
    compiled: int


def _resolve(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _boundary(run: list[fx.Node]) -> tuple[list[fx.Node], list[str], list[fx.Node]]:
    """What the run reads from outside (nodes, attribute targets) and which of its nodes are read outside."""
    members = set(run)
    inputs: list[fx.Node] = []
    attrs: list[str] = []
    for node in run:
        if node.op == "call_module" and node.target not in attrs:
            attrs.append(node.target)
        for arg in node.all_input_nodes:
            if arg in members:
                continue
            if arg.op == "get_attr":
                if arg.target not in attrs:
                    attrs.append(arg.target)
            elif arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in run if any(u not in members for u in n.users)]
    return inputs, attrs, outputs


def _describe(value: Any) -> tuple:
    """What the compiled code may depend on in an attribute: kind, shapes, dtypes, grad flags, classes."""
    if isinstance(value, torch.Tensor):
        kind = "param" if isinstance(value, nn.Parameter) else "tensor"
        return (kind, tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, nn.Module):
        tensors = [*value.named_parameters(), *value.named_buffers()]
        return (
            type(value),
            tuple((n, tuple(t.shape), t.dtype, t.device, t.requires_grad) for n, t in tensors),
            tuple(type(m) for m in value.modules()),
        )
    return (type(value), repr(value))


def _trainable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    return isinstance(value, nn.Module) and any(p.requires_grad for p in value.parameters())


def carries_grad(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from a trainable weight or module (what a backward flows through)."""
    marked: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and _trainable(_resolve(gm, node.target)):
            marked.add(node)
        elif any(a in marked for a in node.all_input_nodes):
            marked.add(node)
    return marked


def _key(
    run: list[fx.Node],
    inputs: list[fx.Node],
    attrs: list[str],
    values: list[Any],
    outputs: list[fx.Node],
    grads: set[fx.Node],
) -> tuple:
    """The run's structure with node names, layer indices and weight names abstracted away."""
    slot = {n: ("in", i) for i, n in enumerate(inputs)}
    slot.update({n: ("node", i) for i, n in enumerate(run)})
    attr_slot = {t: i for i, t in enumerate(attrs)}

    def norm(arg: Any) -> Any:
        def one(n: fx.Node) -> Any:
            return slot[n] if n in slot else ("attr", attr_slot[n.target])

        return repr(fx.node.map_arg(arg, one))

    nodes = tuple(
        (
            n.op,
            ("attr", attr_slot[n.target]) if n.op == "call_module" else n.target,
            norm(n.args),
            norm(n.kwargs),
        )
        for n in run
    )
    flags = tuple(a in grads for a in inputs)
    return (nodes, tuple(_describe(v) for v in values), tuple(slot[o] for o in outputs), flags)


def _template(
    run: list[fx.Node], inputs: list[fx.Node], attrs: list[str], outputs: list[fx.Node], values: list[Any]
) -> Callable[..., Any]:
    """The ``forward`` function of a sub-graph that reads its weights and modules as ``self.a<i>``."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: sub.placeholder(f"x{i}") for i, a in enumerate(inputs)}
    names = {t: f"a{i}" for i, t in enumerate(attrs)}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # a weight read: read it from the body under its canonical name
            env[n] = sub.get_attr(names[n.target])
        return env[n]

    for node in run:
        new = sub.node_copy(node, lookup)
        if node.op == "call_module":
            new.target = names[node.target]
        env[node] = new
    sub.output(tuple(env[o] for o in outputs))
    holder = _body(attrs, values)
    return type(fx.GraphModule(holder, sub, class_name="LayerRegion")).forward


def _body(attrs: list[str], values: list[Any]) -> RegionBody:
    body = RegionBody()
    for i, value in enumerate(values):
        name = f"a{i}"
        if isinstance(value, nn.Parameter):
            body.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            body.register_buffer(name, value, persistent=False)
        elif isinstance(value, nn.Module):
            body.add_module(name, value)
        else:
            setattr(body, name, value)
    return body


def needs_grad(x: Any) -> Any:
    """``x`` as a leaf that requires a gradient while autograd records (unchanged otherwise)."""
    if (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and not x.requires_grad
        and torch.is_grad_enabled()
    ):
        return x.detach().requires_grad_()
    return x


def _widened(key: tuple, uses: dict[tuple, int]) -> tuple | None:
    """A shared shape that differs from ``key`` only in more of its inputs needing a gradient."""
    for other, n in uses.items():
        if n > 1 and other[:3] == key[:3] and all(b or not a for a, b in zip(key[3], other[3])):
            return other
    return None


def _replace(
    graph: fx.Graph, run: list[fx.Node], args: list[fx.Node], outputs: list[fx.Node], name: str, meta: dict
) -> None:
    members = set(run)
    with graph.inserting_before(run[0]):
        call = graph.call_module(name, tuple(args))
        call.meta["fxadapt"] = meta
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for out, value in zip(outputs, results):
        out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in members)
    for node in reversed(run):
        graph.erase_node(node)


def regionalize(
    gm: fx.GraphModule, compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda f: f
) -> RegionReport:
    """Replace each layer run by a ``Region`` call; runs of one shape share ``compile_fn(template)``."""
    graph = gm.graph
    grads = carries_grad(gm)
    found = []
    for path, run in layer_runs(graph):
        inputs, attrs, outputs = _boundary(run)
        if len(run) < 2 or not outputs:
            continue
        values = [_resolve(gm, t) for t in attrs]
        found.append(
            (path, run, inputs, attrs, outputs, values, _key(run, inputs, attrs, values, outputs, grads))
        )
    uses: dict[tuple, int] = {}
    for *_, key in found:
        uses[key] = uses.get(key, 0) + 1
    shared = any(n > 1 for n in uses.values())
    promote = {key: _widened(key, uses) for key, n in uses.items() if n == 1}
    templates: dict[tuple, tuple[int, Callable[..., Any]]] = {}
    for count, (path, run, _, attrs, _, values, key) in enumerate(found):
        inputs, _, outputs = _boundary(run)  # afresh: an earlier region replaced this run's inputs
        args = inputs
        wider = promote.get(key)
        if wider is not None:  # run the shared code, with the inputs it expects to need a gradient
            raised = {i for i, (a, b) in enumerate(zip(key[3], wider[3])) if b and not a}
            with graph.inserting_before(run[0]):
                args = [
                    graph.call_function(needs_grad, (x,)) if i in raised else x for i, x in enumerate(inputs)
                ]
            key = wider
        if key not in templates:
            function = _template(run, inputs, attrs, outputs, values)
            compiled = uses[key] > 1 or not shared
            templates[key] = (len(templates), compile_fn(function) if compiled else function)
        index, run_fn = templates[key]
        name = f"region_{count}"
        gm.add_submodule(name, Region(_body(attrs, values), run_fn, index))
        _replace(graph, run, args, outputs, name, {"kind": "region", "layer": path, "shape": index})
    graph.eliminate_dead_code()
    gm.recompile()
    compiled = sum(1 for key, n in uses.items() if (n > 1 or not shared) and promote.get(key) is None)
    return RegionReport(regions=len(found), shapes=len(templates), compiled=compiled)
