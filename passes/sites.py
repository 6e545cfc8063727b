"""Find where adapters attach: every projection, with its layer and role, read off the graph.

Roles come from structure first: a projection whose output reaches an attention op's query, key or
value operand is ``q``/``k``/``v``; one whose input comes from an attention op is ``o``; inside a
layer, a projection feeding another projection is ``ffn_in`` and the one it feeds is ``ffn_out``.
Names are only the fallback. Nothing here knows about model classes.

A fused projection (GPT-2's ``c_attn``, GPT-NeoX's per-head interleaved ``query_key_value``) gets
the output columns of each role as the graph selects them (``passes.columns``); when the graph's
selection cannot be followed, its ``sections`` are None and ``note`` says why, and a method that
needs them refuses the site and asks for an explicit map, never guessing.

One weight used by several calls (ALBERT's shared layer, DeBERTa-v2's shared key projection) is one
site whose ``calls`` lists every call: an adapter on it applies at each, as in PEFT and AdapterHub.
``find_sites(..., per_call=True)`` gives each call a site of its own (``<key>@<i>``) instead. A 3-D
expert parameter used by a grouped matmul (Mixtral's ``gate_up_proj``) gives one site per expert,
``<key>.<e>``, with ``expert`` set.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

from .columns import column_flow, ranges
from .projections import LINEAR, Call, is_grouped_mm, projection_call

aten = torch.ops.aten

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
PROJECTIONS = LINEAR
ATTENTION = {aten.scaled_dot_product_attention.default}
MATMULS = {aten.matmul.default, aten.bmm.default}
SCORES = MATMULS | {aten.baddbmm.default}  # ops that compute q·kᵀ (baddbmm: BLOOM's alibi + q·kᵀ)
SOFTMAX = {aten.softmax.int, aten._softmax.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
# ops that re-index a score matrix: DeBERTa's relative-position terms pass one before the softmax
_GATHERS = {aten.gather.default, aten.index.Tensor, aten.index_select.default, aten.take_along_dim.default}
_STOPS = (
    PROJECTIONS
    | ATTENTION
    | SCORES
    | SOFTMAX
    | {aten.layer_norm.default, aten.native_layer_norm.default, aten.embedding.default}
)
_LIMIT = 400
_NAME_HINTS = (
    (re.compile(r"(^|\.)(query|q_proj|q|wq|q_lin)$"), "q"),
    (re.compile(r"(^|\.)(key|k_proj|k|wk|k_lin)$"), "k"),
    (re.compile(r"(^|\.)(value|v_proj|v|wv|v_lin)$"), "v"),
    (re.compile(r"(attention\.output\.dense|o_proj|out_proj|attn\.c_proj|wo|out_lin)$"), "o"),
    (re.compile(r"(intermediate\.dense|fc1|c_fc|up_proj|gate_proj|wi|wi_0|wi_1|lin1|w1|w3)$"), "ffn_in"),
    (re.compile(r"(output\.dense|fc2|mlp\.c_proj|down_proj|lin2|w2)$"), "ffn_out"),
    # a bare ``dense`` last: ``intermediate.dense`` (AdapterHub's ViT/BEiT IA3) is ffn_in, not o
    (re.compile(r"(^|\.)dense$"), "o"),
)

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Site:
    """One projection where an adapter can attach (one weight, or one expert of a 3-D weight)."""

    key: str
    node: str  # the output node of the first call (where an adapter's node goes)
    op: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool
    stack: str | None
    layer: int | None
    roles: tuple[str, ...]
    sections: tuple[Ranges, ...] | None  # a fused projection's columns per role, as (start, end) ranges
    found_by: str
    calls: tuple[str, ...] = ()  # output nodes of every call of this weight, in graph order
    expert: int | None = None  # index into a 3-D expert weight's first dim
    note: str = ""  # why a fused projection's sections are unknown

    @property
    def fused(self) -> bool:
        return len(self.roles) > 1

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.calls or (self.node,)

    def each_call(self) -> Iterator[Site]:
        """This site once per call (``node`` set to that call), for passes that work per call."""
        for name in self.nodes:
            yield dataclasses.replace(self, node=name, calls=(name,))

    def columns(self, role: str) -> Ranges:
        """Output columns that belong to ``role`` (all of them for an unfused projection)."""
        if self.sections is None:
            if self.fused:
                raise ValueError(self.refusal())
            return ((0, self.out_features),)
        return self.sections[self.roles.index(role)]

    def width(self, role: str) -> int:
        return sum(b - a for a, b in self.columns(role))

    def refusal(self) -> str:
        """Why this fused site's columns per role are unknown, and what to do."""
        return (
            f"site {self.key!r} computes {'+'.join(self.roles)} in one output, but which columns belong to "
            f"which role cannot be read off the graph ({self.note or 'no section found'}); give them "
            f"explicitly: AdaptedModel(model, site_roles={{{self.key!r}: {{'q': [(start, end), ...], "
            "'k': [...], 'v': [...]}}), or use LoRA's fused_qkv='joint' (one block over the whole output)"
        )


class SiteTable(list):
    """A list of sites that prints as a table.

    ``parameter(target)``, when the runtime sets it, returns the tensor a site's ``weight``/``bias``
    names (a method such as DoRA initialises from the base weight); ``graph`` is the captured graph
    the table was read from (a file format checks what a foreign method would compute there).
    """

    parameter = None
    graph = None

    def __str__(self) -> str:
        head = f"{'site':52} {'role':10} {'layer':>5} {'op':7} {'in':>6} {'out':>6}  found by"
        lines = [head, "-" * len(head)]
        for s in self:
            role = "+".join(s.roles) or "-"
            layer = "-" if s.layer is None else str(s.layer)
            sizes = f"{s.in_features:>6} {s.out_features:>6}"
            calls = f" ({len(s.nodes)} calls)" if len(s.nodes) > 1 else ""
            lines.append(f"{s.key:52} {role:10} {layer:>5} {s.op:7} {sizes}  {s.found_by}{calls}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython shows the table
        p.text(str(self))

    def by_key(self) -> dict[str, Site]:
        return {s.key: s for s in self}


def _projection_parts(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(input, weight get_attr) of a projection node (any get_attr weight), or None."""
    call = projection_call(node, lambda target: True)
    return (call.x, call.weight) if call is not None else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    try:
        return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
    except (TypeError, RuntimeError):
        return None


def _forward(start: fx.Node) -> Iterator[tuple[fx.Node, int]]:
    """Stop nodes reached from ``start`` through shape/elementwise ops: (node, operand index)."""
    seen = set()
    queue = deque([start])
    while queue and len(seen) < _LIMIT:
        node = queue.popleft()
        for user in node.users:
            if user.op == "output":
                continue
            if user.op == "call_function" and (user.target in _STOPS or is_grouped_mm(user)):
                yield user, _operand(user, node)
                continue
            if user not in seen:
                seen.add(user)
                queue.append(user)


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


def _scores_operand(stop: fx.Node, idx: int) -> int | None:
    """0 for the left, 1 for the right factor of a scores op (baddbmm's are args 1 and 2)."""
    if stop.target is aten.baddbmm.default:
        return {1: 0, 2: 1}.get(idx)
    return idx if idx in (0, 1) else None


def _role_at(stop: fx.Node, idx: int) -> str | None:
    """The attention role of operand ``idx`` of ``stop``, if it is an attention operand."""
    if stop.target in ATTENTION:
        return "qkv"[idx] if idx in (0, 1, 2) else None
    if stop.target in SCORES:
        side = _scores_operand(stop, idx)
        if side is None:
            return None
        left = stop.args[1] if stop.target is aten.baddbmm.default else stop.args[0]
        if side == 1 and _backward_reaches(left, SOFTMAX):
            return "v"
        if _feeds_softmax(stop):
            return "q" if side == 0 else "k"
    return None


def _feeds_softmax(matmul: fx.Node) -> bool:
    """Whether the matmul's output reaches a softmax as is (scaled, masked), not re-indexed."""
    seen, queue = set(), deque([matmul])
    while queue and len(seen) < _LIMIT:
        n = queue.popleft()
        for u in n.users:
            if u.op == "call_function" and u.target in SOFTMAX:
                return True
            if (
                u.op == "call_function"
                and u.target not in _STOPS
                and u.target not in _GATHERS
                and u not in seen
            ):
                seen.add(u)
                queue.append(u)
    return False


def _attention_roles(call: Call, width: int, value_of) -> tuple[dict[str, frozenset | None], str]:
    """Roles (q/k/v) this projection's output plays at attention ops, with the columns of each."""
    found, failed = column_flow(call.out, width, _attention_stop, value_of)
    roles: dict[str, frozenset | None] = {}
    for (stop, idx), state in found.items():
        role = _role_at(stop, idx)
        if role is None:
            continue
        cols = state.columns if state is not None else None
        if role in roles:
            prev = roles[role]
            roles[role] = None if prev is None or cols is None else prev | cols
        else:
            roles[role] = cols
    note = f"{failed.format_node()}" if failed is not None else "an op the column analysis does not follow"
    return roles, note


def _attention_stop(node: fx.Node) -> bool:
    """Where the search for a projection's attention operands stops; a per-head norm is crossed."""
    if node.op != "call_function":
        return True
    if node.target in (aten.layer_norm.default, aten.native_layer_norm.default):
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        return not (isinstance(val, torch.Tensor) and val.dim() > 3)  # [B, S, H, D]: q/k norms per head
    return node.target in _STOPS or is_grouped_mm(node)


def _layer_of(key: str) -> tuple[str | None, int | None]:
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p)
    return None, None


def role_hint(key: str) -> str | None:
    """The role a module name suggests (``query`` -> q, ``intermediate.dense`` -> ffn_in): a hint only."""
    return _role_by_name(key)


def _role_by_name(key: str) -> str | None:
    for pattern, role in _NAME_HINTS:
        if pattern.search(key):
            return role
    return None


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


def _resolve(gm: fx.GraphModule, target: str) -> object:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _value_of(gm: fx.GraphModule):
    """A function giving a node's constant tensor value (an index list lifted by export), or None."""

    def value_of(node: object) -> torch.Tensor | None:
        while (
            isinstance(node, fx.Node)
            and node.op == "call_function"
            and node.target
            in (
                aten.lift_fresh_copy.default,
                aten.clone.default,
                aten._to_copy.default,
                aten.detach.default,
            )
        ):
            node = node.args[0]
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value = _resolve(gm, node.target)
            return value if isinstance(value, torch.Tensor) and not value.is_floating_point() else None
        return None

    return value_of


def _call_roles(calls: list[Call], value_of) -> dict[fx.Node, tuple[tuple[str, ...], tuple | None, str, str]]:
    """Structure roles per call: (roles, sections, found_by, note)."""
    attention_out = ATTENTION | SCORES
    out: dict[fx.Node, tuple] = {}
    for c in calls:
        width = _out_features(c)
        found, note = _attention_roles(c, width, value_of)
        if found:
            order = tuple(r for r in "qkv" if r in found)
            secs, why = None, ""
            if len(order) > 1:
                cols = [found[r] for r in order]
                if any(x is None for x in cols):
                    why = f"the graph selects them with {note}"
                elif any(a & b for i, a in enumerate(cols) for b in cols[i + 1 :]):
                    why = "several roles read the same columns"
                else:
                    secs = tuple(ranges(x) for x in cols)
            out[c.node] = (order, secs, "structure", why)
        elif _backward_reaches(c.x, attention_out) and _reads_attention(c.x):
            out[c.node] = (("o",), None, "structure", "")
    return out


def _out_features(c: Call) -> int:
    shape = _shape(c.weight)
    return shape[-2] if not c.transposed else shape[-1]


def _ffn_roles(calls: list[Call], keys: dict[fx.Node, str], roles: dict) -> None:
    """Inside a layer: a projection feeding another is ``ffn_in``, the one it feeds ``ffn_out``.

    A layer with several such pairs (X-MOD's language adapters after its FFN) keeps the pair its
    names call an FFN, else the widest (the FFN's intermediate is wider than an adapter's bottleneck).
    """
    by_node = {c.node: c for c in calls}
    by_layer: dict[tuple, list[fx.Node]] = {}
    for c in calls:
        by_layer.setdefault(_layer_of(keys[c.node]), []).append(c.node)
    for (_stack, layer), members in by_layer.items():
        if layer is None:
            continue
        free = [n for n in members if n not in roles]
        pairs = []
        for n in free:
            for stop, _ in _forward(by_node[n].out):
                if stop in free and stop is not n:
                    pairs.append((n, stop))
        if not pairs:
            continue
        groups: dict[fx.Node, set[fx.Node]] = {}  # ffn_out -> its ffn_in
        for a, b in pairs:
            groups.setdefault(b, set()).add(a)
        if len(groups) > 1:
            named = {b: ins for b, ins in groups.items() if _role_by_name(keys[b]) == "ffn_out"}
            if len(named) == 1:
                groups = named
            else:
                widest = max(groups, key=lambda b: _in_features(by_node[b]))
                groups = {widest: groups[widest]}
        for out_node, ins in groups.items():
            roles[out_node] = (("ffn_out",), None, "structure", "")
            for n in ins:
                roles[n] = (("ffn_in",), None, "structure", "")


def _in_features(c: Call) -> int:
    shape = _shape(c.weight)
    return shape[-1] if not c.transposed else shape[-2]


def find_sites(gm: fx.GraphModule, prefix: str = "", per_call: bool = False) -> SiteTable:
    """All projection sites of ``gm``; ``prefix`` is stripped from weight names to form site keys."""

    def is_param(target: str) -> bool:
        return isinstance(_resolve(gm, target), torch.nn.Parameter)

    calls = [c for n in gm.graph.nodes if (c := projection_call(n, is_param)) is not None]
    keys = {}
    for c in calls:
        key = c.weight.target[len(prefix) :] if c.weight.target.startswith(prefix) else c.weight.target
        keys[c.node] = key[: -len(".weight")] if key.endswith(".weight") else key
    roles = _call_roles(calls, _value_of(gm))
    _ffn_roles(calls, keys, roles)

    groups: dict[str, list[Call]] = {}
    for c in calls:
        groups.setdefault(keys[c.node], []).append(c)
    table = SiteTable()
    for key, members in groups.items():
        if per_call and len(members) > 1:
            for i, c in enumerate(members):
                table.extend(_sites(f"{key}@{i}", [c], roles, layer=i))
        else:
            table.extend(_sites(key, members, roles))
    return table


def _merge_roles(members: list[Call], roles: dict) -> tuple[tuple[str, ...], tuple | None, str, str]:
    """One weight's roles over all its calls: their union; sections must agree."""
    found = [roles[c.node] for c in members if c.node in roles]
    if not found:
        return (), None, "none", ""
    order = tuple(r for r in ROLES if any(r in f[0] for f in found))
    if len(found) == 1 or all(f[:2] == found[0][:2] for f in found):
        return order, found[0][1], found[0][2], found[0][3]
    fused = [f for f in found if len(f[0]) > 1]
    if not fused:
        return order, None, "structure", ""
    return order, None, "structure", "its calls split the output differently"


def _sites(key: str, members: list[Call], roles: dict, layer: int | None = None) -> list[Site]:
    first = members[0]
    stack, by_name = _layer_of(key)
    layer = by_name if layer is None else layer
    role, secs, how, note = _merge_roles(members, roles)
    if layer is None:  # roles are a layer's; a projection outside the layers (a head, a pooler) has none
        role, secs, how, note = (), None, "none", ""
    elif not role:
        hint = _role_by_name(key.split("@")[0])
        role, how = ((hint,), "name") if hint else ((), "none")
    op = _op_name(first)
    shape = _shape(first.weight)
    in_f, out_f = (shape[-2], shape[-1]) if first.transposed else (shape[-1], shape[-2])
    common = dict(
        node=first.out.name,
        op=op,
        weight=first.weight.target,
        bias=first.bias.target if first.bias is not None else None,
        in_features=in_f,
        out_features=out_f,
        transposed=first.transposed,
        stack=stack,
        layer=layer,
        roles=role,
        sections=secs,
        found_by=how,
        calls=tuple(c.out.name for c in members),
        note=note,
    )
    if first.experts is None:
        return [Site(key=key, **common)]
    return [Site(key=f"{key}.{e}", expert=e, **common) for e in range(first.experts)]


def _op_name(c: Call) -> str:
    if c.offs is not None:
        return "grouped"
    if c.node.target is aten.linear.default:
        return "linear"
    return str(c.node.target).split(".")[1]


def override_roles(table: SiteTable, roles: dict[str, object]) -> SiteTable:
    """Set roles by hand for an unusual model: ``{regex on site key: role(s)}``; ``()`` clears them.

    A fused projection takes ``{role: [(start, end), ...]}``: the output columns of each role. Roles
    given as a tuple keep the sections read off the graph when they are for the same roles.
    """
    for value in roles.values():
        given = list(value) if isinstance(value, dict) else ([value] if isinstance(value, str) else value)
        bad = [r for r in given if r not in ROLES]
        if bad:
            raise ValueError(f"site_roles: unknown role(s) {sorted(bad)}; valid roles: {list(ROLES)}")
    out = SiteTable()
    for site in table:
        for pattern, role in roles.items():
            if re.search(pattern, site.key):
                site = _override(site, role)
                break
        out.append(site)
    return out


def _override(site: Site, role: object) -> Site:
    if isinstance(role, dict):
        new = tuple(role)
        secs = []
        for r in new:
            spans = tuple((int(a), int(b)) for a, b in role[r])
            if any(not 0 <= a < b <= site.out_features for a, b in spans):
                raise ValueError(
                    f"site_roles: columns {list(spans)} of role {r!r} are outside {site.key!r}'s "
                    f"{site.out_features} output columns"
                )
            secs.append(spans)
        sections = tuple(secs) if len(new) > 1 else None
        return dataclasses.replace(site, roles=new, sections=sections, found_by="user", note="")
    new = (role,) if isinstance(role, str) else tuple(role)
    keep = len(new) > 1 and site.roles == new
    sections = site.sections if keep else None
    note = site.note if keep else "roles given without columns"
    return dataclasses.replace(site, roles=new, sections=sections, found_by="user", note=note)
