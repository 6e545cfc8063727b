"""Find where adapters attach: every projection, with its layer and role, read off the graph.

Roles come from structure first: a projection whose output reaches an attention op's query, key or
value operand is ``q``/``k``/``v`` (one that reaches several, like GPT-2's ``c_attn``, is fused and
gets the output columns of each); one whose input comes from an attention op is ``o``; inside a
layer, a projection feeding another projection is ``ffn_in`` and the one it feeds is ``ffn_out``.
Names are only the fallback. Nothing here knows about model classes.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default}
ATTENTION = {aten.scaled_dot_product_attention.default}
MATMULS = {aten.matmul.default, aten.bmm.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_STOPS = (
    PROJECTIONS
    | ATTENTION
    | MATMULS
    | SOFTMAX
    | {aten.layer_norm.default, aten.native_layer_norm.default, aten.embedding.default}
)
_LIMIT = 400
_NAME_HINTS = (
    (re.compile(r"(^|\.)(query|q_proj|q|wq|q_lin)$"), "q"),
    (re.compile(r"(^|\.)(key|k_proj|k|wk|k_lin)$"), "k"),
    (re.compile(r"(^|\.)(value|v_proj|v|wv|v_lin)$"), "v"),
    (re.compile(r"(attention\.output\.dense|o_proj|out_proj|attn\.c_proj|wo|out_lin|dense)$"), "o"),
    (re.compile(r"(intermediate\.dense|fc1|c_fc|up_proj|gate_proj|wi|wi_0|wi_1|lin1|w1|w3)$"), "ffn_in"),
    (re.compile(r"(output\.dense|fc2|mlp\.c_proj|down_proj|lin2|w2)$"), "ffn_out"),
)


@dataclass(frozen=True)
class Site:
    """One projection where an adapter can attach."""

    key: str
    node: str
    op: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool
    stack: str | None
    layer: int | None
    roles: tuple[str, ...]
    sections: tuple[tuple[int, int], ...] | None
    found_by: str

    @property
    def fused(self) -> bool:
        return len(self.roles) > 1

    def columns(self, role: str) -> tuple[int, int]:
        """Output columns that belong to ``role`` (all of them for an unfused projection)."""
        if self.sections is None:
            return (0, self.out_features)
        return self.sections[self.roles.index(role)]


class SiteTable(list):
    """A list of sites that prints as a table."""

    def __str__(self) -> str:
        head = f"{'site':52} {'role':10} {'layer':>5} {'op':7} {'in':>6} {'out':>6}  found by"
        lines = [head, "-" * len(head)]
        for s in self:
            role = "+".join(s.roles) or "-"
            layer = "-" if s.layer is None else str(s.layer)
            sizes = f"{s.in_features:>6} {s.out_features:>6}"
            lines.append(f"{s.key:52} {role:10} {layer:>5} {s.op:7} {sizes}  {s.found_by}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython shows the table
        p.text(str(self))

    def by_key(self) -> dict[str, Site]:
        return {s.key: s for s in self}


def _bias_of(node: fx.Node) -> str | None:
    """The get_attr target of a projection's bias, if it has one."""
    b = node.args[0] if node.target is aten.addmm.default else (node.args[2] if len(node.args) > 2 else None)
    return b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None


def _projection_parts(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(input, weight get_attr) of a projection node, or None if it is not one."""
    if node.op != "call_function" or node.target not in PROJECTIONS:
        return None
    if node.target is aten.addmm.default:
        x, w = node.args[1], node.args[2]
    else:
        x, w = node.args[0], node.args[1]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    return x, w


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _forward(start: fx.Node) -> Iterator[tuple[fx.Node, int, tuple[int, int] | None]]:
    """Stop nodes reached from ``start`` through shape/elementwise ops: (node, operand index, section)."""
    seen = set()
    queue = deque([(start, None)])
    while queue and len(seen) < _LIMIT:
        node, section = queue.popleft()
        for user in node.users:
            sec = section
            if section is None:
                sec = _section(node, user)
            if user.op == "output" or (user.op == "call_function" and user.target in _STOPS):
                if user.op != "output":
                    yield user, _operand(user, node), sec
                continue
            if (user, sec) not in seen:
                seen.add((user, sec))
                queue.append((user, sec))


def _backward_reaches(start: fx.Node, targets: set) -> bool:
    """Whether ``start`` derives from a node whose target is in ``targets`` through non-stop ops."""
    seen = set()
    queue = deque([start])
    while queue and len(seen) < _LIMIT:
        node = queue.popleft()
        if node.op == "call_function" and node.target in targets:
            return True
        if node.op != "call_function" or node.target in _STOPS:
            continue
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return False


def _operand(user: fx.Node, arg: fx.Node) -> int:
    for i, a in enumerate(user.args):
        if a is arg:
            return i
    return -1


def _last_dim(node: fx.Node, dim: int) -> bool:
    shape = _shape(node)
    return shape is not None and dim % len(shape) == len(shape) - 1


def _section(node: fx.Node, user: fx.Node) -> tuple[int, int] | None:
    """Output columns selected when ``user`` slices ``node`` along its last dim."""
    if user.op != "call_function" or user.target is not aten.slice.Tensor or len(user.args) < 4:
        return None
    dim, start, end = user.args[1], user.args[2], user.args[3]
    if isinstance(start, int) and isinstance(end, int) and _last_dim(node, dim):
        return (start, min(end, _shape(node)[-1]))
    return None


def _split_bounds(split: fx.Node) -> list[tuple[int, int]] | None:
    """Column ranges of a split along the last dim, or None for a split along another dim."""
    src = split.args[0]
    dim = split.args[2] if len(split.args) > 2 else 0
    if not _last_dim(src, dim):
        return None
    width = _shape(src)[-1]
    sizes = split.args[1]
    if isinstance(sizes, int):
        sizes = [sizes] * ((width + sizes - 1) // sizes)
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, min(start + s, width)))
        start += s
    return bounds


def _attention_roles(node: fx.Node) -> dict[str, tuple[int, int] | None]:
    """Roles (q/k/v) this projection's output plays at attention ops, with its columns if fused."""
    roles: dict[str, tuple[int, int] | None] = {}
    for stop, idx, sec in _split_aware_forward(node):
        role = None
        if stop.target in ATTENTION and idx in (0, 1, 2):
            role = "qkv"[idx]
        elif stop.target in MATMULS:
            if idx == 1 and _backward_reaches(stop.args[0], SOFTMAX):
                role = "v"
            elif _feeds_softmax(stop):
                role = "q" if idx == 0 else "k"
        if role and role not in roles:
            roles[role] = sec
    return roles


def _split_aware_forward(node: fx.Node):
    """Like ``_forward``, but a split's getitems come first, each with its own columns."""
    for user in _users_through_views(node):
        if user.op == "call_function" and user.target in SPLITS:
            bounds = _split_bounds(user)
            if bounds is None:
                continue
            for item in user.users:
                for stop, idx, _ in _forward(item):
                    yield stop, idx, bounds[item.args[1]]
    yield from _forward(node)


def _users_through_views(node: fx.Node) -> list[fx.Node]:
    out, frontier = [], [node]
    views = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
    while frontier:
        n = frontier.pop()
        for u in n.users:
            out.append(u)
            if u.op == "call_function" and u.target in views:
                frontier.append(u)
    return out


def _feeds_softmax(matmul: fx.Node) -> bool:
    seen, queue = set(), deque([matmul])
    while queue and len(seen) < _LIMIT:
        n = queue.popleft()
        for u in n.users:
            if u.op == "call_function" and u.target in SOFTMAX:
                return True
            if u.op == "call_function" and u.target not in _STOPS and u not in seen:
                seen.add(u)
                queue.append(u)
    return False


def _layer_of(key: str) -> tuple[str | None, int | None]:
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p)
    return None, None


def _role_by_name(key: str) -> str | None:
    for pattern, role in _NAME_HINTS:
        if pattern.search(key):
            return role
    return None


def find_sites(gm: fx.GraphModule, prefix: str = "") -> SiteTable:
    """All projection sites of ``gm``; ``prefix`` is stripped from weight names to form site keys."""
    nodes = [n for n in gm.graph.nodes if _projection_parts(n)]
    info = {}
    for n in nodes:
        x, w = _projection_parts(n)
        shape = _shape(w) or tuple(_resolve(gm, w.target).shape)
        transposed = n.target is not aten.linear.default
        in_f, out_f = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        key = w.target[len(prefix) :] if w.target.startswith(prefix) else w.target
        key = key[: -len(".weight")] if key.endswith(".weight") else key
        info[n] = dict(key=key, x=x, w=w, in_f=in_f, out_f=out_f, transposed=transposed)

    attention_out = ATTENTION | MATMULS
    roles: dict[fx.Node, tuple[tuple[str, ...], tuple | None, str]] = {}
    for n in nodes:
        found = _attention_roles(n)
        if found:
            order = tuple(r for r in "qkv" if r in found)
            secs = None
            if len(order) > 1:
                secs = tuple(found[r] or _thirds(info[n]["out_f"], order.index(r)) for r in order)
            roles[n] = (order, secs, "structure")
        elif _backward_reaches(info[n]["x"], attention_out) and _reads_attention(info[n]["x"]):
            roles[n] = (("o",), None, "structure")

    by_layer: dict[tuple, list[fx.Node]] = {}
    for n in nodes:
        by_layer.setdefault(_layer_of(info[n]["key"]), []).append(n)
    for (_stack, layer), members in by_layer.items():
        if layer is None:
            continue
        free = [n for n in members if n not in roles]
        for n in free:
            for stop, _, _ in _forward(n):
                if stop in free and stop is not n and _projection_parts(stop)[0] is not None:
                    roles.setdefault(stop, (("ffn_out",), None, "structure"))
        for n in free:
            if n not in roles and any(s in roles and roles[s][0] == ("ffn_out",) for s, _, _ in _forward(n)):
                roles[n] = (("ffn_in",), None, "structure")

    table = SiteTable()
    for n in nodes:
        d = info[n]
        stack, layer = _layer_of(d["key"])
        role, secs, how = roles.get(n, ((), None, "none"))
        if not role and layer is not None:
            hint = _role_by_name(d["key"])
            role, how = ((hint,), "name") if hint else ((), "none")
        op = "linear" if n.target is aten.linear.default else str(n.target).split(".")[1]
        table.append(
            Site(
                key=d["key"],
                node=n.name,
                op=op,
                weight=d["w"].target,
                bias=_bias_of(n),
                in_features=d["in_f"],
                out_features=d["out_f"],
                transposed=d["transposed"],
                stack=stack,
                layer=layer,
                roles=role,
                sections=secs,
                found_by=how,
            )
        )
    return table


def _reads_attention(x: fx.Node) -> bool:
    """True when ``x`` comes straight from an attention op's output (SDPA or probs @ V)."""
    seen, queue = set(), deque([x])
    while queue and len(seen) < _LIMIT:
        n = queue.popleft()
        if n.op == "call_function" and n.target in ATTENTION:
            return True
        if n.op == "call_function" and n.target in MATMULS:
            return _backward_reaches(n.args[0], SOFTMAX)
        if n.op != "call_function" or n.target in _STOPS:
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return False


def _thirds(width: int, i: int) -> tuple[int, int]:
    step = width // 3
    return (i * step, (i + 1) * step)


def _resolve(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def override_roles(table: SiteTable, roles: dict[str, str | tuple[str, ...]]) -> SiteTable:
    """Set roles by hand for an unusual model: ``{regex on site key: role(s)}``; ``()`` clears them."""
    bad = {r for v in roles.values() for r in ((v,) if isinstance(v, str) else v) if r not in ROLES}
    if bad:
        raise ValueError(f"site_roles: unknown role(s) {sorted(bad)}; valid roles: {list(ROLES)}")
    out = SiteTable()
    for site in table:
        for pattern, role in roles.items():
            if re.search(pattern, site.key):
                new = (role,) if isinstance(role, str) else tuple(role)
                fused = len(new) > 1
                sections = tuple(_thirds(site.out_features, i) for i in range(len(new))) if fused else None
                site = dataclasses.replace(site, roles=new, sections=sections, found_by="user")
                break
        out.append(site)
    return out
