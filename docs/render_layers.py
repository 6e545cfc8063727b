"""Draw one layer of a tiny BERT's graph before and after each adapter method: docs/img/<method>.png.

Run from the repository root (about a second per method on a CPU; needs matplotlib and networkx):

    OMP_NUM_THREADS=1 python docs/render_layers.py                        # every method listed below
    OMP_NUM_THREADS=1 python docs/render_layers.py --methods lora mam     # some of them

``--methods`` takes method names or config strings (``"lora[r=4]"``; the file is named after the
method), ``--out`` another folder, ``--attn eager`` eager attention instead of SDPA.

The model is BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
intermediate_size=64, vocab_size=100)) with SDPA attention: the attention is one ``sdpa`` node, where
eager attention has five (matmul, mul, mask add, softmax, matmul), which leaves room to see what an
adapter changes around it. It is captured with ``fxadapt.AdaptedModel`` and drawn from ``graph_module``
in eval mode (no dropout nodes). Each figure has two panels: the base graph (no adapter active) and
the graph with the adapter, both cut to layer 0 of the encoder; for an adapter at the embeddings
(prompt tuning, invertible adapters) to the embeddings and layer 0's attention block, or all of layer 0
when the adapter also has nodes there.

Shape bookkeeping (views, transposes, size reads, asserts, ...) is left out, its inputs drawn connected
through; weights are not drawn. Inserted nodes are those whose names the base graph lacks (not every
pass marks its nodes with ``meta["fxadapt"]``): adapter modules (orange, labelled with the module's
class) and the helper functions and methods the passes call (yellow: ``cat_prefix``, ``pad_mask``,
``prefixes``, ``prepend``). Base nodes that the pass removed are drawn dashed in the left panel. The
main chain (each op's first operand) runs straight down, residual connections in a lane on its left.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Patch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402
from torch import fx  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: fxadapt and passes are importable from the root

import fxadapt  # noqa: E402

METHODS = [
    "lora",
    "ia3",
    "seq_bn",
    "double_seq_bn",
    "par_bn",
    "compacter",
    "seq_bn_inv",
    "prefix_tuning",
    "prompt_tuning",
    "loreft",
]
LATER = ["mam", "unipelt"]  # drawn too when fxadapt registers them
# the tiny model's hidden size is 32: Compacter's default reduction_factor=32 gives a bottleneck of 1,
# which phm_dim=4 does not divide
TINY = {"compacter": "compacter[reduction_factor=8]", "compacter++": "compacter++[reduction_factor=8]"}

EMBEDDINGS, LAYER, ATTENTION = "embeddings", "encoder.layer.0", "encoder.layer.0.attention"
# shape bookkeeping, drawn as if it were not there
NOISE = {
    "sym_size",
    "sym_numel",
    "_assert_tensor_metadata",
    "_assert_scalar",
    "expand",
    "view",
    "reshape",
    "transpose",
    "permute",
    "contiguous",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "gather",
    "getitem",
    "to",
    "clone",
    "alias",
    "detach",
    "dropout",
}
SHORT = {"scaled_dot_product_attention": "sdpa", "softmax": "softmax", "_softmax": "softmax"}
COLOURS = {
    "adapter": "#f4a261",  # inserted adapter module
    "inserted": "#ffe8a3",  # inserted helper function / method
    "base": "#a8dadc",
    "input": "#e4e4e4",
}
LEGEND = {
    "adapter": "adapter module (inserted)",
    "inserted": "helper op (inserted)",
    "base": "base op",
    "input": "from outside the region",
}
# layout units: rows are ROW apart; a label is about CHAR per character plus PAD wide (at the panels'
# narrowest scale, HALF data units either side of the centre); boxes in a row are at least GAP apart
ROW, CHAR, PAD, GAP, HALF = 1.0, 0.078, 0.12, 0.22, 2.4
DPI = 90  # 7.8 inches: 700 pixels wide
LANES = 0.6  # room left of the main chain for the lanes of residual edges


# ---- model and graphs -----------------------------------------------------------------------------
def tiny_bert(attn: str = "sdpa") -> fxadapt.AdaptedModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        attn_implementation=attn,
    )
    model = fxadapt.AdaptedModel(BertModel(config))
    model.eval()
    return model


def graph_with(model: fxadapt.AdaptedModel, adapter: str | None) -> fx.GraphModule:
    """The eval-mode graph with only ``adapter`` active (None: the base graph)."""
    model.set_active_adapters(adapter)
    return model.graph_module


# ---- which nodes to draw --------------------------------------------------------------------------
def op_name(node: fx.Node) -> str:
    """``aten.linear.default`` -> ``linear``; a Python function -> its name; a method -> its name."""
    target = node.target
    if node.op in ("call_method", "get_attr", "placeholder", "output"):
        return str(target)
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_opname"):  # an OpOverload
        name = target._opname
    return name.split(".")[-1]


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]


def in_module(node: fx.Node, path: str) -> bool:
    pattern = re.compile(rf"(^|\.){re.escape(path)}(\.|$)")
    return any(pattern.search(p) for p in module_paths(node))


def is_new(node: fx.Node, base_names: set[str]) -> bool:
    """A node the base graph lacks: added by an adapter's pass."""
    return node.name not in base_names and node.op not in ("placeholder", "output")


def kind(node: fx.Node, base_names: set[str]) -> str:
    """``adapter`` (a module), ``inserted`` (a pass's helper function or method) or ``base``: copies
    of the model's own ops that a pass makes (``getitem``, re-derived lengths) count as base ops."""
    if not is_new(node, base_names):
        return "base"
    if node.op == "call_module":
        return "adapter"
    if "fxadapt" in node.meta or node.op == "call_method":
        return "inserted"
    return "inserted" if getattr(node.target, "__module__", "").startswith("passes") else "base"


def is_noise(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_module" or node.op == "call_method":
        return False
    val = node.meta.get("val")
    if val is not None and not isinstance(val, torch.Tensor):  # SymInt and other sizes
        return True
    if getattr(node.target, "__module__", None) == "_operator":  # size arithmetic a pass added, getitem
        return True
    return op_name(node) in NOISE


def adapter_layer(node: fx.Node) -> int | None:
    site = (node.meta.get("fxadapt") or {}).get("site", "")
    m = re.search(r"\.layer\.(\d+)\.", site)
    return int(m.group(1)) if m else None


def region_paths(gm: fx.GraphModule, base_names: set[str]) -> tuple[str, ...]:
    """Layer 0; with the embeddings before it when an adapter node reads the embeddings' output."""
    inserted = [n for n in gm.graph.nodes if is_new(n, base_names) and "fxadapt" in n.meta]
    at_embeddings = any(
        adapter_layer(n) is None and any(in_module(a, EMBEDDINGS) for a in n.all_input_nodes)
        for n in inserted
    )
    if not at_embeddings:
        return (LAYER,)
    in_layer = any(adapter_layer(n) == 0 for n in inserted)
    return (EMBEDDINGS, LAYER if in_layer else ATTENTION)


def select_region(gm: fx.GraphModule, base_names: set[str], paths: tuple[str, ...]) -> list[fx.Node]:
    """The base nodes inside the modules ``paths``, and the inserted nodes that belong there, in graph
    order.

    An inserted node with ``meta["fxadapt"]`` belongs where its site is (layer 0, or its attention
    block); one whose site has no layer (shared parameters, an invertible or prompt module) belongs if
    it feeds a node of the region or reads one; one without that meta (a helper function, the prefix
    pool's ``prefixes``) belongs if it feeds a node of the region.
    """
    nodes = list(gm.graph.nodes)
    member: set[fx.Node] = set()
    for n in nodes:
        if is_new(n, base_names):
            continue
        if n.op == "call_function" and any(in_module(n, p) for p in paths):
            member.add(n)
    for n in reversed(nodes):  # users before their inputs
        if not is_new(n, base_names) or n.op == "get_attr":
            continue
        layer = adapter_layer(n)
        if layer is not None:
            if layer == 0 and (LAYER in paths or "attention" in n.meta["fxadapt"]["site"]):
                member.add(n)
        elif any(u in member for u in n.users):
            member.add(n)
        elif "fxadapt" in n.meta and any(a in member for a in n.all_input_nodes):
            member.add(n)
    return [n for n in nodes if n in member]


# ---- the graph to draw ----------------------------------------------------------------------------
def label(node: fx.Node, gm: fx.GraphModule, roles: dict[str, str]) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        # what the class name does not tell: a parallel bottleneck, PHM projections (Compacter)
        extra = ["parallel"] if getattr(module, "parallel", False) is True else []
        extra += ["PHM"] if any(type(m).__name__ == "PHMLayer" for m in module.modules()) else []
        return type(module).__name__ + (f"\n({', '.join(extra)})" if extra else "")
    name = op_name(node)
    if name == "linear" and node.name in roles:
        return f"linear {roles[node.name]}"
    if name == "embedding":
        which = module_paths(node)[-1].rsplit(".", 1)[-1].replace("_embeddings", "")
        return f"emb {which.replace('position', 'pos').replace('token_type', 'type')}"
    return SHORT.get(name, name)


def outside_label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return str(node.target).removeprefix("tensors_")
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and (val.dtype == torch.bool or val.dim() == 4):  # SDPA's, eager's
        return "mask"
    deepest = max(module_paths(node), key=len, default="").removeprefix("m.")
    layer = re.match(r".*layer\.(\d+)", deepest)
    return f"layer {layer.group(1)} out" if layer else f"{deepest.split('.')[0] or 'model'} out"


def to_nx(
    gm: fx.GraphModule, region: list[fx.Node], base_names: set[str], removed: set[str], roles: dict[str, str]
) -> nx.DiGraph:
    """The nodes to draw (attributes: label, kind, order in the graph, dashed: removed by the pass,
    outside: not in the region) and their edges (slot: the operand's place; via: through ops not
    drawn), bookkeeping nodes bypassed. An input from outside the region computed by a pass's helper
    (prompt tuning's ``prepend`` on the attention mask) is drawn with that helper above it."""
    members = set(region)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    G = nx.DiGraph()

    def sources(arg: fx.Node, seen: set[fx.Node]) -> list[fx.Node]:
        """What ``arg`` shows as: itself, or (bookkeeping) the drawn nodes it is computed from."""
        if arg in seen:
            return []
        seen.add(arg)
        val = arg.meta.get("val")
        if arg.op == "get_attr" or (val is not None and not isinstance(val, torch.Tensor)):
            return []  # weights, and sizes read off a tensor (a view's target shape)
        if arg in members:
            if not is_noise(arg):
                return [arg]
        else:
            if arg.op == "placeholder" or isinstance(val, torch.Tensor) or "fxadapt" in arg.meta:
                return [arg]
            return []
        return [s for a in arg.all_input_nodes for s in sources(a, seen)]

    for n in region:
        if is_noise(n):
            continue
        G.add_node(
            n.name,
            label=label(n, gm, roles),
            kind=kind(n, base_names),
            order=order[n],
            dashed=n.name in removed,
        )
        for slot, a in enumerate(n.all_input_nodes):  # slot: the operand's place (0: the first)
            for s in sources(a, set()):
                if s.name not in G:
                    ours = "fxadapt" in s.meta
                    text = label(s, gm, roles) if ours else outside_label(s)
                    G.add_node(
                        s.name,
                        label=text,
                        kind=kind(s, base_names) if ours else "input",
                        order=order[s],
                        dashed=False,
                        outside=True,
                    )
                if s.name != n.name and not G.has_edge(s.name, n.name):
                    G.add_edge(s.name, n.name, slot=slot)
    for n in [m for m in gm.graph.nodes if m.name in G and G.nodes[m.name]["kind"] == "input"]:
        for helper in inserted_upstream(n, base_names):  # e.g. prompt tuning's prepend on the mask
            G.add_node(helper.name, label=label(helper, gm, roles), kind="inserted", order=order[helper])
            G.nodes[helper.name].update(dashed=False, outside=True)
            G.add_edge(helper.name, n.name, slot=0, via=True)
            for ph in helper.all_input_nodes:
                if ph.op == "placeholder":
                    G.add_node(ph.name, label=outside_label(ph), kind="input", order=order[ph])
                    G.nodes[ph.name].update(dashed=False, outside=True)
                    G.add_edge(ph.name, helper.name, slot=0)
    return G


def inserted_upstream(node: fx.Node, base_names: set[str], limit: int = 200) -> list[fx.Node]:
    """The passes' helper functions that an input from outside the region is computed from."""
    found, seen, todo = [], set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                if kind(a, base_names) == "inserted" and a.op == "call_function":
                    found.append(a)
                else:
                    todo.append(a)
    return found


# ---- layout ---------------------------------------------------------------------------------------
def rows(G: nx.DiGraph) -> dict[str, int]:
    """Longest path from the region's input; nodes from outside sit one row above their first user,
    and a region node that reads nothing drawn sits one row above its first user."""
    inner = G.subgraph([n for n in G if not G.nodes[n].get("outside")])
    row: dict[str, int] = {}
    for n in nx.topological_sort(inner):
        row[n] = max((row[p] + 1 for p in inner.predecessors(n)), default=0)
    for n in reversed(list(nx.topological_sort(inner))):
        if G.in_degree(n) == 0 and inner.out_degree(n):
            row[n] = max(row[n], min(row[s] for s in inner.successors(n)) - 1)
    for n in reversed(list(nx.topological_sort(G))):
        if n not in row:
            row[n] = min((row[s] for s in G.successors(n) if s in row), default=0) - 1
    return row


def label_width(text: str) -> float:
    return CHAR * max(len(line) for line in text.split("\n")) + PAD


def spine(G: nx.DiGraph) -> list[str]:
    """The main chain, found backwards from the last node through each op's first operand drawn (the
    query of an attention, the block output of a residual add) and each adapter module's latest one
    (a LoRA's projection output rather than its input, a bottleneck's block output)."""
    inner = [n for n in G if not G.nodes[n].get("outside")]
    node = max(inner, key=lambda n: G.nodes[n]["order"])
    chain = [node]
    while True:
        preds = [p for p in G.predecessors(node) if not G.nodes[p].get("outside")]
        if not preds:
            break
        if G.nodes[node]["kind"] == "adapter":
            node = max(preds, key=lambda p: G.nodes[p]["order"])
        else:
            node = min(preds, key=lambda p: G.edges[p, node]["slot"])
        chain.append(node)
    return chain[::-1]


def place_row(side: list[tuple[float, str]], width: dict[str, float], start: float) -> dict[str, float]:
    """Side nodes of one row, in the given order, as near to their desired x as their widths allow,
    none left of ``start``."""
    x: dict[str, float] = {}
    edge = start
    for want, n in side:
        x[n] = max(want, edge + width[n] / 2)
        edge = x[n] + width[n] / 2 + GAP
    return x


def layout(G: nx.DiGraph, sweeps: int = 6) -> dict[str, tuple[float, float]]:
    """Rows by longest path; the main chain straight down at x = 0 (residual edges then run in a lane
    on its left); every other node to its right, by alternating barycentre sweeps, then by moves
    that make it easier to read (``untangle``)."""
    row = rows(G)
    width = {n: label_width(G.nodes[n]["label"]) for n in G}
    chain = spine(G)
    top = min(G.predecessors(chain[0]), key=lambda p: G.edges[p, chain[0]]["slot"], default=None)
    if top is not None and row[top] == row[chain[0]] - 1:  # the input the chain starts from, above it
        chain.insert(0, top)
    chain = set(chain)
    by_row: dict[int, list[str]] = {}
    for n in sorted(
        G, key=lambda n: (G.nodes[n].get("outside", False) and n not in chain, G.nodes[n]["order"])
    ):
        if n not in chain:
            by_row.setdefault(row[n], []).append(n)
    # side nodes start right of the chain's box, or of its line in a row that its edge passes
    start = {
        r: max((width[n] / 2 + GAP for n in chain if row[n] == r), default=GAP) for r in set(row.values())
    }
    x = {n: 0.0 for n in chain}
    for r, names in by_row.items():
        x.update(place_row([(0.0, n) for n in names], width, start[r]))
    levels = sorted(by_row)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for r in levels if down else reversed(levels):
            desired = {}
            for n in by_row[r]:
                near = list(G.predecessors(n) if down else G.successors(n))
                # neighbours in the next row count most: an adapter node stays under its projection
                weight = {s: 1 / max(abs(row[s] - row[n]), 1) ** 2 for s in near}
                desired[n] = sum(x[s] * w for s, w in weight.items()) / sum(weight.values()) if near else x[n]
            # graph order among equals; what comes from outside (masks) at the row's right end
            names = sorted(by_row[r], key=lambda n: (G.nodes[n].get("outside", False), desired[n]))
            by_row[r] = names
            x.update(place_row([(desired[n], n) for n in names], width, start[r]))
    untangle(G, row, x, width, by_row, start)
    return {n: (x[n], -row[n] * ROW) for n in G}


def _cross(p1, p2, p3, p4) -> bool:
    """Whether segments p1-p2 and p3-p4 cross (properly)."""

    def side(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    d1, d2 = side(p3, p4, p1), side(p3, p4, p2)
    d3, d4 = side(p1, p2, p3), side(p1, p2, p4)
    return d1 * d2 < 0 and d3 * d4 < 0


def tangle(G: nx.DiGraph, row: dict[str, int], x: dict[str, float], width: dict[str, float]) -> float:
    """How hard the layout is to read: crossings of straight edges, some for each edge that runs
    through a box (it is then drawn in a lane beside them) and for the layout's width, a little for
    the edges' width, and more for each pair of a row out of graph order."""
    p = {n: (x[n], -row[n] * ROW) for n in G}

    def through_box(a: str, b: str) -> bool:
        for n in G:
            if n in (a, b) or not p[b][1] < p[n][1] < p[a][1]:
                continue
            t = (p[n][1] - p[a][1]) / (p[b][1] - p[a][1])
            if abs(p[a][0] + t * (p[b][0] - p[a][0]) - p[n][0]) < width[n] / 2 + 0.05:
                return True
        return False

    lanes = {(a, b) for a, b in G.edges if through_box(a, b)}
    straight = [e for e in G.edges if e not in lanes]
    score = 0.5 * len(lanes) + 0.15 * max(x[n] + width[n] / 2 for n in G)  # lanes are fine; width less so
    for i, (a, b) in enumerate(straight):
        for c, d in straight[i + 1 :]:
            if not {a, b} & {c, d} and _cross(p[a], p[b], p[c], p[d]):
                score += 1
    score += 0.01 * sum(abs(p[a][0] - p[b][0]) for a, b in G.edges)
    rows_: dict[int, list[str]] = {}
    for n in sorted(G, key=lambda n: x[n]):
        rows_.setdefault(row[n], []).append(n)
    for names in rows_.values():  # graph order (q, k, v) from left to right
        for i, n in enumerate(names):
            score += 1.5 * sum(G.nodes[n]["order"] > G.nodes[m]["order"] for m in names[i + 1 :])
    return score


def untangle(
    G: nx.DiGraph,
    row: dict[str, int],
    x: dict[str, float],
    width: dict[str, float],
    by_row: dict[int, list[str]],
    start: dict[int, float],
) -> None:
    """Swap neighbours beside the chain, or move one a little, while that lowers ``tangle`` (the
    graphs here are small); inputs from outside stay at the right end of their row."""
    best = tangle(G, row, x, width)
    improved = True
    while improved:
        improved = False
        for r, names in by_row.items():
            trials = []
            for i in range(len(names) - 1):
                if G.nodes[names[i + 1]].get("outside") != G.nodes[names[i]].get("outside"):
                    continue
                order = names[:i] + [names[i + 1], names[i]] + names[i + 2 :]
                trials.append((order, sorted(x[n] for n in names)))
            for n in names:
                for step in (-0.9, -0.6, -0.3, 0.3, 0.6, 0.9):
                    trials.append((names, [x[m] + (step if m == n else 0.0) for m in names]))
            scored = []
            for order, wants in trials:
                trial = dict(x)
                trial.update(place_row(list(zip(wants, order)), width, start[r]))
                scored.append((tangle(G, row, trial, width), order, trial))
            score, order, trial = min(scored, key=lambda t: t[0], default=(best, names, x))
            if score < best - 1e-9:  # the best move in this row
                best, improved = score, True
                x.update(trial)
                names[:] = order


# ---- drawing --------------------------------------------------------------------------------------
def crosses(x0: float, y0: float, x1: float, y1: float, box, margin: float = 4) -> bool:
    """Whether the segment (x0, y0)-(x1, y1) passes through ``box`` (display coordinates)."""
    ya, yb = max(min(y0, y1), box.y0 - margin), min(max(y0, y1), box.y1 + margin)
    if ya > yb or y0 == y1:
        return False
    xa, xb = (x0 + (x1 - x0) * (y - y0) / (y1 - y0) for y in (ya, yb))
    return min(xa, xb) < box.x1 + margin and max(xa, xb) > box.x0 - margin


def route(u: str, v: str, pos: dict[str, tuple[float, float]], extent: dict) -> list | None:
    """None for a straight arrow; else the corners (display coordinates, from the edge of ``u``'s box
    to the edge of ``v``'s) of an arrow that runs down a lane beside the boxes a straight one would
    cross (residual connections, long skips). It leaves ``u`` sideways, or downwards when boxes of
    its row are in the way, and enters ``v`` sideways, or from above likewise. The lane goes left of
    those boxes unless the right needs fewer detours or is much shorter."""
    a, b = extent[u], extent[v]
    ax0, ay0, bx0, by0 = (a.x0 + a.x1) / 2, (a.y0 + a.y1) / 2, (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2
    yu, yv = pos[u][1], pos[v][1]
    inner = [e for n, e in extent.items() if yv < pos[n][1] < yu]
    crossed = [e for e in inner if crosses(ax0, ay0, bx0, by0, e)]
    if not crossed:
        return None
    left, right = min(e.x0 for e in crossed) - 7, max(e.x1 for e in crossed) + 7
    moved = True
    while moved:  # the lane must stay clear of every box in the rows it runs past
        moved = False
        for e in inner:
            if e.x0 - 7 < left < e.x1 + 7:
                left, moved = e.x0 - 7, True
            if e.x0 - 7 < right < e.x1 + 7:
                right, moved = e.x1 + 7, True

    def blocked(end: str, lane: float, x: float) -> bool:
        """Whether a box of ``end``'s row lies between ``x`` and the lane."""
        lo, hi = min(lane, x), max(lane, x)
        return any(
            e.x1 > lo and e.x0 < hi for n, e in extent.items() if n not in (u, v) and pos[n][1] == pos[end][1]
        )

    def path(lane: float) -> tuple[int, float, list]:
        go_left = lane < ax0
        gap_a = (a.y0 - max((e.y1 for e in inner), default=b.y1)) / 2  # half the gap below u's row
        gap_b = (min((e.y0 for e in inner), default=a.y0) - b.y1) / 2  # half the gap above v's row
        detours = 0
        if a.x0 + 3 <= lane <= a.x1 - 3:  # straight down out of u's box
            points = [(lane, a.y0)]
        elif blocked(u, lane, ax0):
            points = [(ax0, a.y0), (ax0, a.y0 - gap_a), (lane, a.y0 - gap_a)]
            detours += 1
        else:
            points = [(a.x0 if go_left else a.x1, ay0), (lane, ay0)]
        if b.x0 + 3 <= lane <= b.x1 - 3:  # straight down into v's box
            points += [(lane, b.y1)]
        elif blocked(v, lane, bx0) or (b.x0 <= lane if go_left else lane <= b.x1):
            points += [(lane, b.y1 + gap_b), (bx0, b.y1 + gap_b), (bx0, b.y1)]
            detours += 1
        else:
            points += [(lane, by0), (b.x0 if go_left else b.x1, by0)]
        length = sum(abs(p[0] - q[0]) + abs(p[1] - q[1]) for p, q in zip(points, points[1:]))
        return detours, length, points

    (dl, ll, pl), (dr, lr, pr) = path(left), path(right)
    return pl if (dl, ll) <= (dr, lr + 40) else pr


def rounded(points: list, radius: float = 4.0) -> tuple[list, list]:
    """Vertices and codes of a polyline whose corners are rounded (quadratic curves)."""
    verts, codes = [points[0]], [MplPath.MOVETO]
    for prev, corner, nxt in zip(points, points[1:], points[2:]):
        d_in = ((corner[0] - prev[0]) ** 2 + (corner[1] - prev[1]) ** 2) ** 0.5 or 1.0
        d_out = ((nxt[0] - corner[0]) ** 2 + (nxt[1] - corner[1]) ** 2) ** 0.5 or 1.0
        r = min(radius, d_in / 2, d_out / 2)
        before = (corner[0] - (corner[0] - prev[0]) * r / d_in, corner[1] - (corner[1] - prev[1]) * r / d_in)
        after = (corner[0] + (nxt[0] - corner[0]) * r / d_out, corner[1] + (nxt[1] - corner[1]) * r / d_out)
        verts += [before, corner, after]
        codes += [MplPath.LINETO, MplPath.CURVE3, MplPath.CURVE3]
    verts.append(points[-1])
    codes.append(MplPath.LINETO)
    return verts, codes


def draw_nodes(ax: plt.Axes, G: nx.DiGraph, pos: dict[str, tuple[float, float]], title: str) -> dict:
    """One labelled box per node, coloured by kind; returns the text objects."""
    boxes = {}
    for n, (px, py) in pos.items():
        data = G.nodes[n]
        boxes[n] = ax.text(
            px,
            py,
            data["label"],
            ha="center",
            va="center",
            fontsize=7.5,
            zorder=3,
            bbox=dict(
                boxstyle="round,pad=0.3",
                fc=COLOURS[data["kind"]],
                ec="#c0392b" if data["dashed"] else "#555",
                lw=1.2 if data["dashed"] else 0.6,
                ls="--" if data["dashed"] else "-",
            ),
        )
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return boxes


def draw_edges(ax: plt.Axes, G: nx.DiGraph, pos: dict[str, tuple[float, float]], boxes: dict) -> None:
    """Arrows from box edge to box edge; call once the figure's layout is final and drawn."""
    extent = {n: box.get_bbox_patch().get_window_extent() for n, box in boxes.items()}
    style = dict(arrowstyle="-|>", mutation_scale=7, lw=0.7, color="#666", zorder=2)
    for u, v in G.edges:
        corners = route(u, v, pos, extent)
        # computed through ops not drawn (outside the region): dashed
        style["linestyle"] = "--" if G.edges[u, v].get("via") else "-"
        if corners is None:
            ax.add_patch(
                FancyArrowPatch(
                    pos[u],
                    pos[v],
                    shrinkA=1,
                    shrinkB=1,
                    patchA=boxes[u].get_bbox_patch(),
                    patchB=boxes[v].get_bbox_patch(),
                    **style,
                )
            )
        else:
            verts, codes = rounded(corners)
            data = ax.transData.inverted().transform(verts)
            ax.add_patch(FancyArrowPatch(path=MplPath(data, codes), **style))


def figure(
    panels: list[tuple[nx.DiGraph, dict[str, tuple[float, float]], str]], caption: str, path: Path
) -> None:
    """Panels side by side on one scale, a legend of the kinds shown, saved as a small PNG."""
    ys = [p[1] for _, pos, _ in panels for p in pos.values()]
    lo = min(pos[n][0] - label_width(G.nodes[n]["label"]) / 2 for G, pos, _ in panels for n in G) - LANES
    hi = max(pos[n][0] + label_width(G.nodes[n]["label"]) / 2 for G, pos, _ in panels for n in G) + 0.3
    span = max(hi - lo, 2 * HALF)  # wider layouts get a wider figure, so that labels keep their room
    height = (max(ys) - min(ys)) / ROW + 1
    fig, axes = plt.subplots(1, len(panels), figsize=(7.8 * span / (2 * HALF), 0.36 * height + 0.9), dpi=DPI)
    boxes = []
    for ax, (G, pos, title) in zip(axes, panels):
        boxes.append(draw_nodes(ax, G, pos, title))
        ax.set_xlim(lo, lo + span)
        ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    kinds = [k for k in LEGEND if any(G.nodes[n]["kind"] == k for G, _, _ in panels for n in G)]
    handles = [Patch(fc=COLOURS[k], ec="#555", lw=0.6, label=LEGEND[k]) for k in kinds]
    if any(G.nodes[n]["dashed"] for G, _, _ in panels for n in G):
        handles.append(Patch(fc="white", ec="#c0392b", ls="--", lw=1.2, label="removed by the pass"))
    if any(G.edges[e].get("via") for G, _, _ in panels for e in G.edges):
        handles.append(Line2D([], [], color="#666", ls="--", lw=0.7, label="through ops not drawn"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(caption, fontsize=9.5)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.canvas.draw()  # places and sizes the label boxes, so that arrows can stop at their edges
    for ax, (G, pos, _), bx in zip(axes, panels, boxes):
        draw_edges(ax, G, pos, bx)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# ---- one method -----------------------------------------------------------------------------------
def render(model: fxadapt.AdaptedModel, spec: str, out: Path) -> Path:
    method = spec.split("[", 1)[0].strip()
    name = re.sub(r"\W", "_", method)
    roles = {s.node: "+".join(s.roles) for s in model.sites() if s.roles}
    base = graph_with(model, None)
    base_names = {n.name for n in base.graph.nodes}
    model.add_adapter(name, TINY.get(spec, spec))
    try:
        after = graph_with(model, name)
        paths = region_paths(after, base_names)
        removed = base_names - {n.name for n in after.graph.nodes}
        g_before = to_nx(base, select_region(base, base_names, paths), base_names, removed, roles)
        g_after = to_nx(after, select_region(after, base_names, paths), base_names, set(), roles)
    finally:
        model.set_active_adapters(None)
        model.delete_adapter(name)
    where = " + ".join("layer 0" if p == LAYER else p.replace(LAYER + ".", "layer 0 ") for p in paths)
    path = out / f"{method}.png"
    figure(
        [(g_before, layout(g_before), "base"), (g_after, layout(g_after), f"with {method}")],
        f"{method}: {where}, before and after",
        path,
    )
    return path


COMPOSED = {
    # figure name -> (adapters, setup, fusion): one layer with a composition block (docs/composition.md)
    "compose_stack": ({"a": "seq_bn", "b": "seq_bn"}, "Stack('a', 'b')", False),
    "compose_fuse": ({"a": "seq_bn", "b": "seq_bn", "c": "seq_bn"}, "Fuse('a', 'b', 'c')", True),
    "compose_batchsplit": ({"a": "lora", "b": "lora"}, "BatchSplit('a', 'b', batch_sizes=[1, 1])", False),
}


def render_setup(model: fxadapt.AdaptedModel, name: str, out: Path) -> Path:
    """One layer before and after a composed setup (``COMPOSED[name]``)."""
    adapters, text, fusion = COMPOSED[name]
    blocks = {b: getattr(fxadapt, b) for b in ("Stack", "Fuse", "BatchSplit", "Parallel", "Average", "Split")}
    setup = eval(text, {}, blocks)  # noqa: S307 (a fixed string above)
    roles = {s.node: "+".join(s.roles) for s in model.sites() if s.roles}
    base = graph_with(model, None)
    base_names = {n.name for n in base.graph.nodes}
    for adapter, config in adapters.items():
        model.add_adapter(adapter, config)
    try:
        if fusion:
            model.add_adapter_fusion(setup)
        model.set_active_adapters(setup)
        after = model.graph_module
        paths = region_paths(after, base_names)
        removed = base_names - {n.name for n in after.graph.nodes}
        g_before = to_nx(base, select_region(base, base_names, paths), base_names, removed, roles)
        g_after = to_nx(after, select_region(after, base_names, paths), base_names, set(), roles)
    finally:
        model.set_active_adapters(None)
        if fusion:
            model.delete_adapter_fusion(setup)
        for adapter in adapters:
            model.delete_adapter(adapter)
    path = out / f"{name}.png"
    figure(
        [(g_before, layout(g_before), "base"), (g_after, layout(g_after), f"with {text}")],
        f"{text}: layer 0, before and after",
        path,
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    known = set(fxadapt.method_names())
    default = METHODS + [m for m in LATER if m in known]
    parser.add_argument("--methods", nargs="+", default=default, help=f"default: {' '.join(default)}")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    parser.add_argument("--compose", nargs="*", default=None, help=f"composed setups: {' '.join(COMPOSED)}")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = tiny_bert(args.attn)
    jobs = [(render, spec) for spec in args.methods] if args.compose is None else []
    jobs += [(render_setup, name) for name in (args.compose or COMPOSED if args.compose is not None else [])]
    for fn, spec in jobs:
        path = fn(model, spec, args.out)
        print(
            f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  {path.stat().st_size // 1024} KB"
        )


if __name__ == "__main__":
    main()
