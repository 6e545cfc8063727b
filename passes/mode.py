"""Specialise a training graph for evaluation: dropout becomes the identity."""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
_SDPA = aten.scaled_dot_product_attention.default


def to_eval(graph: fx.Graph) -> int:
    """Remove dropout nodes and zero SDPA's ``dropout_p``; returns how many nodes changed."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed += 1
        elif node.target is _SDPA:
            if len(node.args) > 4 and node.args[4]:
                node.args = (*node.args[:4], 0.0, *node.args[5:])
                changed += 1
            elif node.kwargs.get("dropout_p"):
                node.kwargs = {**node.kwargs, "dropout_p": 0.0}
                changed += 1
    return changed
