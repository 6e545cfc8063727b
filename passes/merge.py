"""Remove adapter nodes whose effect has been folded into the base weights."""

from __future__ import annotations

from torch import fx


def drop_modules(graph: fx.Graph, targets: set[str]) -> int:
    """Bypass every adapter node of a module in ``targets``; its users read its base input.

    That is a ``call_module`` node, or a grouped expert update ``first.grouped(x, y, ...)``
    (``passes.lora``) whose first module is in ``targets``.
    """
    removed = 0
    for node in list(graph.nodes):
        grouped = (
            node.op == "call_method"
            and node.target == "grouped"
            and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "get_attr"
            and node.args[0].target in targets
        )
        if (node.op == "call_module" and node.target in targets) or grouped:
            node.replace_all_uses_with(node.args[2] if grouped else node.args[1])
            graph.erase_node(node)
            removed += 1
    return removed
