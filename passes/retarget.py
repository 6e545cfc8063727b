"""Point a graph's parameter reads elsewhere: an adapter's own copy of a base parameter (``modules_to_save``)."""

from __future__ import annotations

from torch import fx


def retarget(graph: fx.Graph, targets: dict[str, str]) -> int:
    """Rewrite every ``get_attr`` whose target is a key of ``targets``; returns how many changed."""
    changed = 0
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in targets:
            node.target = targets[node.target]
            changed += 1
    return changed
