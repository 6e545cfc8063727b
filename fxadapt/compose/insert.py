"""Insert an active setup into a graph: plan it per pass, replicate the batch for ``Parallel``, run the passes.

Per-row routing and AdapterDrop as a tensor add graph inputs (``passes.compose.ROUTE_INPUT``,
``KEEP_INPUT``) that the runtime fills at each call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import fx

from passes.compose import (
    KEEP_INPUT,
    ROUTE_INPUT,
    Leaf,
    Plan,
    add_input,
    batch_size,
    replicate_inputs,
    scaled_batch,
)

from ..errors import FxAdaptError
from .blocks import AdapterCompositionBlock
from .drop import Drop
from .plan import normalize, plan
from .route import Route


def insert_setup(
    graph: fx.Graph,
    sites: Any,
    setup: Any,
    adapters: Any,
    fusion_target: Callable[[str, str], Any],
    drop: Drop | None = None,
    select: Callable[[Any, dict[str, str]], dict[str, str]] | None = None,
    parallelized: bool = False,
) -> list[fx.Node]:
    """Every node the active ``setup`` adds to ``graph``; a ``Parallel`` setup also repeats the inputs,
    unless they are ``parallelized`` already (they hold the ``channels·B`` rows)."""
    setup = normalize(setup)
    passes = plan(setup, adapters, fusion_target, drop, select)
    added: list[fx.Node] = []
    if not passes:
        return added
    inputs = {
        "route": add_input(graph, ROUTE_INPUT) if isinstance(setup, Route) else None,
        "drop": add_input(graph, KEEP_INPUT) if drop is not None and drop.tensor else None,
    }
    channels = setup.parallel_channels if isinstance(setup, AdapterCompositionBlock) else 1
    batch = None
    if channels > 1 and not parallelized:
        batch = scaled_batch(graph, replicate_inputs(graph, channels), channels)
    elif channels > 1 or any(isinstance(t, Plan) for p in passes for t in p.targets.values()):
        batch = batch_size(graph)
    for group in passes:
        takes_plans = any(m.compose for m in group.methods)
        targets = {k: _for_pass(t, takes_plans, batch, inputs) for k, t in group.targets.items()}
        try:
            added += group.insert(graph, sites, targets)
        except (KeyError, ValueError) as exc:
            names = ", ".join(m.name for m in group.methods)
            raise FxAdaptError(
                f"the active setup does not fit the graph of this call ({names}): {exc}"
            ) from exc
    return added


def _for_pass(tree: Any, takes_plans: bool, batch: Any, inputs: dict[str, Any]) -> Any:
    if isinstance(tree, Leaf):
        return tree if takes_plans else tree.target
    return _with_nodes(tree, batch, inputs)


def _with_nodes(tree: Any, batch: Any, inputs: dict[str, Any]) -> Any:
    """The plan with its graph nodes: the batch size, and the input a route or drop plan reads."""
    if not isinstance(tree, Plan):
        return tree
    children = tuple(_with_nodes(c, batch, inputs) for c in tree.children)
    return dataclasses.replace(tree, children=children, batch=batch, index=inputs.get(tree.kind))
