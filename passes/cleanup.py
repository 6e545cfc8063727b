"""Tidy a rewritten graph: drop dead nodes and check it is well formed."""

from __future__ import annotations

from torch import fx


def clone(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with the same node names, so sites found on the original still apply."""
    new = fx.Graph()
    out = new.graph_copy(graph, {}, return_output_node=True)
    value, node = out if isinstance(out, tuple) else (out, None)
    new.output(value)
    new._codegen = graph._codegen
    return new


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove nodes nothing reads (e.g. what a removed dropout left behind), lint, regenerate code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
