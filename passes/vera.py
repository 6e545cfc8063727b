"""Insert VeRA modules after the projections they adapt, each handed the shared random projections.

``targets`` holds the site modules and, under ``SHARED``, the module that owns the frozen random
matrices every site shares (``vera_A`` ``[r, max in]``, ``vera_B`` ``[max out, r]``); each site's node
is ``module(x, y, vera_A, vera_B)``, read once at the graph's start.
"""

from __future__ import annotations

from torch import fx

from .lora import insert_after
from .sites import Site

SHARED = "shared_parameters"


def insert_vera(graph: fx.Graph, sites: list[Site], targets: dict[str, str]) -> list[fx.Node]:
    if SHARED not in targets:
        raise KeyError("VeRA needs its shared projections (target 'shared_parameters')")
    shared = targets[SHARED]
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        a = graph.get_attr(f"{shared}.lora_A")
        b = graph.get_attr(f"{shared}.lora_B")
    sites_only = {k: t for k, t in targets.items() if k != SHARED}
    return [a, b, *insert_after(graph, sites, sites_only, lambda site: (a, b), grouped=False)]
