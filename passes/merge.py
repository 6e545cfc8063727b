"""Remove adapter nodes whose effect has been folded into the base weights."""

from __future__ import annotations

from torch import fx


def drop_modules(graph: fx.Graph, targets: set[str]) -> int:
    """Bypass every ``call_module`` node whose target is in ``targets``; its users read its base input."""
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in targets:
            node.replace_all_uses_with(node.args[1])
            graph.erase_node(node)
            removed += 1
    return removed
