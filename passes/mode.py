"""Specialise a training graph for evaluation: dropout becomes the identity.

Dropout is the one training-only op removed here. Anything else a training graph does differently
(stochastic depth's ``rand``/``floor``, LayerDrop, batch norm with batch statistics) cannot be
undone on the graph, since the eval branch was never traced: ``eval_differs`` says so, and the
runtime then captures the model in eval mode instead.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
_SDPA = aten.scaled_dot_product_attention.default
_RANDOM = {
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "bernoulli",
    "normal",
    "uniform",
    "multinomial",
    "exponential",
    "native_dropout",
}
_BATCH_NORMS = {
    aten.batch_norm.default,
    aten.native_batch_norm.default,
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit_functional.default,
}


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


def eval_differs(graph: fx.Graph) -> str | None:
    """Why removing dropout would not give the eval-mode computation, or None when it would.

    A random op other than dropout (stochastic depth, LayerDrop, noise) or a batch norm in training
    mode marks a ``self.training`` branch that dropout removal cannot undo.
    """
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target._schema.name.split("::")[-1].rstrip("_")
        if name in _RANDOM:
            return f"random op {node.target} ({node.name})"
        if node.target in _BATCH_NORMS:
            if len(node.args) > 5 and node.args[5] is True:
                return f"batch norm in training mode ({node.name})"
    return None
