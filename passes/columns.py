"""Which output columns of a projection reach each operand downstream: its view/split/permute read exactly.

A fused projection (GPT-2's ``c_attn``, GPT-NeoX's and BLOOM's per-head interleaved
``query_key_value``, Falcon's multi-query layout) computes q, k and v in one output; which columns
are which is decided by what the graph does with that output. This module follows the output
through the graph's layout ops, carrying for every element the output column it came from, so the
columns that reach an attention operand are read off the graph, never assumed.

The state of a tensor derived from the projection's output is either

- a *layout*: an integer tensor ``ids`` with one entry per feature element (``lead`` dims, such as
  batch and sequence, have size 1 in ``ids``), exact through view/reshape (when the batch-like dims
  lead), permute/transpose, select/slice/index/split/chunk/unbind, expand, (un)squeeze, cat and
  elementwise ops with tensors that do not derive from the projection;
- a *set* of columns, when elements have been combined (rotary embeddings add a rotated copy) or a
  reshape mixes batch-like and feature dims (BLOOM's ``[B·H, S, D]``): which columns contribute is
  still exact, their positions are not, so a later op that selects a part of a set gives *unknown*;
- *unknown* (``None``): an op this module does not model selected a part of the tensor.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SAME = {  # ops whose output element i is a function of input element i (plus other, non-derived tensors)
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten.type_as.default,
    aten.neg.default,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.pow.Tensor_Scalar,
    aten.rsqrt.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
    aten.masked_fill.Scalar,
    aten.where.self,
    aten.dropout.default,
}
# a static cache's write, ``index_copy_(cache, dim, positions, new)`` along a batch-like dim: the written
# entries keep the columns of ``new`` (the rest of the cache derives from no projection)
_CACHE_WRITES = {aten.index_copy_.default, aten.index_copy.default}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.var.correction, aten.amax.default}
# a norm over a head's features (Persimmon's q/k LayerNorm) mixes the columns it reads
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}


@dataclass(frozen=True)
class Cols:
    """The columns behind a tensor: exact per element (``ids``), or only as a set (``ids`` is None).

    After a norm over a head's features each element stands for its whole row: its id is the row's
    representative and ``groups`` maps a representative to the row's columns.
    """

    ids: torch.Tensor | None
    lead: tuple[bool, ...]
    columns: frozenset[int]
    groups: tuple[tuple[int, frozenset[int]], ...] = ()

    @staticmethod
    def layout(ids: torch.Tensor, lead: tuple[bool, ...], groups: dict | None = None) -> Cols:
        groups = groups or {}
        cols = frozenset().union(*(groups.get(i, {i}) for i in set(ids.reshape(-1).tolist())))
        return Cols(ids, tuple(lead), cols, tuple(sorted(groups.items())))

    def derive(self, ids: torch.Tensor, lead: tuple[bool, ...]) -> Cols:
        """A layout of the same elements (a view, a slice): the groups carry over."""
        return Cols.layout(ids, lead, dict(self.groups))

    @staticmethod
    def union(states: list[Cols]) -> Cols:
        cols = frozenset().union(*(s.columns for s in states))
        return Cols(None, (), cols)

    @staticmethod
    def merged_groups(states: list[Cols]) -> dict:
        out: dict = {}
        for s in states:
            out.update(dict(s.groups))
        return out


def _shape(node: object) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _concrete(d: object) -> int | None:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        try:
            return int(d.node.expr) if d.node.expr.is_number else None
        except (AttributeError, TypeError):
            return None
    return None


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _is_layout(s: object) -> bool:
    return isinstance(s, Cols) and s.ids is not None


def _sym(d: object):
    """A dim as a sympy expression (symbolic sizes compare by expression)."""
    import sympy

    if isinstance(d, torch.SymInt):
        return d.node.expr
    return sympy.Integer(int(d))


def _groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Match the dims of two shapes of one tensor into groups of equal size (a reshape's blocks)."""
    import sympy

    if not a or not b:
        return None
    sa, sb = [_sym(d) for d in a], [_sym(d) for d in b]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(sa) and j < len(sb):
        gi, gj = [i], [j]
        pa, pb = sa[i], sb[j]
        i, j = i + 1, j + 1
        while sympy.expand(pa - pb) != 0:
            _, den = sympy.fraction(sympy.cancel(pb / pa))
            grow_a = den == 1  # b's block is a multiple of a's: take in more of a
            if grow_a and i < len(sa):
                gi.append(i)
                pa, i = pa * sa[i], i + 1
            elif j < len(sb):
                gj.append(j)
                pb, j = pb * sb[j], j + 1
            elif i < len(sa):
                gi.append(i)
                pa, i = pa * sa[i], i + 1
            else:
                return None
        out.append((gi, gj))
    if any(sympy.expand(d - 1) != 0 for d in sa[i:] + sb[j:]):
        return None
    if out:  # trailing size-1 dims join the last group
        out[-1] = (out[-1][0] + list(range(i, len(sa))), out[-1][1] + list(range(j, len(sb))))
    return out


def _view(s: Cols, in_shape: tuple | None, out_shape: tuple | None) -> Cols:
    """A reshape: exact when every block of merged/split dims is all batch-like or all feature dims."""
    if s.ids is None:
        return s
    groups = _groups(in_shape, out_shape) if in_shape is not None and out_shape is not None else None
    if groups is None or len(in_shape) != s.ids.dim():
        return Cols.union([s])
    target, lead = [], []
    for gi, gj in groups:
        kinds = {s.lead[d] for d in gi if s.ids.shape[d] != 1 or not s.lead[d]}
        if kinds == {True} or not kinds:
            target += [1] * len(gj)
            lead += [True] * len(gj)
        elif kinds == {False} and not any(s.lead[d] and _concrete(in_shape[d]) != 1 for d in gi):
            sizes = [_concrete(out_shape[d]) for d in gj]
            if any(x is None for x in sizes):
                return Cols.union([s])
            target += sizes
            lead += [False] * len(gj)
        else:
            return Cols.union([s])
    try:
        return s.derive(s.ids.reshape(target), tuple(lead))
    except RuntimeError:
        return Cols.union([s])


def _select(s: Cols, dim: int, index: object) -> Cols | None:
    if s.ids is None:
        return None
    d = _dim(dim, s.ids.dim())
    if s.lead[d]:
        return s.derive(s.ids.select(d, 0), s.lead[:d] + s.lead[d + 1 :])
    if not isinstance(index, int):
        return None
    return s.derive(s.ids.select(d, index), s.lead[:d] + s.lead[d + 1 :])


def _slice(s: Cols, dim: int, start: object, end: object, step: object) -> Cols | None:
    if s.ids is None:
        return None
    d = _dim(dim, s.ids.dim())
    if s.lead[d]:
        return s
    if not all(isinstance(v, int) or v is None for v in (start, end, step)):
        return None
    idx = [slice(None)] * s.ids.dim()
    idx[d] = slice(start, end, step or 1)
    return s.derive(s.ids[tuple(idx)], s.lead)


def _split(s: Cols, dim: int, sizes: list[int]) -> list[Cols] | None:
    if s.ids is None or s.lead[_dim(dim, s.ids.dim())]:
        return None
    pieces = torch.split(s.ids, sizes, dim=_dim(dim, s.ids.dim()))
    return [s.derive(p, s.lead) for p in pieces]


def _index(s: Cols, indices: list, value_of) -> Cols | None:
    """Advanced indexing with constant index tensors on feature dims (Falcon's ``[..., [-2], :]``)."""
    if s.ids is None:
        return None
    picks = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(picks) != 1:
        return None
    d, node = picks[0]
    if s.lead[d]:
        return None
    index = value_of(node)
    if index is None:
        return None
    key = [slice(None)] * s.ids.dim()
    key[d] = index.long()
    out = s.ids[tuple(key)]
    lead = s.lead[:d] + (False,) * index.dim() + s.lead[d + 1 :]
    return s.derive(out, lead)


def _expand(s: Cols, sizes: list) -> Cols:
    if s.ids is None:
        return s
    extra = len(sizes) - s.ids.dim()
    ids = s.ids.reshape(*([1] * extra), *s.ids.shape)
    lead = (True,) * extra + s.lead
    target = []
    for d, size in enumerate(sizes):
        c = _concrete(size)
        if lead[d] or c is None or c == -1:
            target.append(ids.shape[d])
        else:
            target.append(c)
    return s.derive(ids.expand(*target), lead)


def _broadcast(s: Cols, out_shape: tuple | None) -> Cols:
    """Elementwise with a non-derived operand: the output may gain leading (lead) dims."""
    if s.ids is None or out_shape is None or len(out_shape) <= s.ids.dim():
        return s
    extra = len(out_shape) - s.ids.dim()
    return s.derive(s.ids.reshape(*([1] * extra), *s.ids.shape), (True,) * extra + s.lead)


def _transfer(node: fx.Node, states: dict[fx.Node, object], value_of) -> object:
    """The state of ``node``'s output given its inputs' states (only called for derived nodes)."""
    t = node.target
    args = node.args
    src = args[0] if args else None
    s = states.get(src) if isinstance(src, fx.Node) else None
    if t in _CACHE_WRITES:
        return _cache_write(node, states)
    if t is operator.getitem:
        seq = states.get(src)
        return seq[args[1]] if isinstance(seq, list) and args[1] < len(seq) else None
    if t in _VIEWS or t in (aten.flatten.using_ints, aten.unflatten.int):
        return _view(s, _shape(src), _shape(node)) if isinstance(s, Cols) else None
    if t is aten.permute.default:
        if not _is_layout(s):
            return s
        return s.derive(s.ids.permute(*args[1]), tuple(s.lead[i] for i in args[1]))
    if t is aten.transpose.int:
        if not _is_layout(s):
            return s
        n = s.ids.dim()
        a, b = _dim(args[1], n), _dim(args[2], n)
        lead = list(s.lead)
        lead[a], lead[b] = lead[b], lead[a]
        return s.derive(s.ids.transpose(a, b), tuple(lead))
    if t is aten.t.default:
        if not _is_layout(s):
            return s
        return s.derive(s.ids.t(), tuple(reversed(s.lead)))
    if t is aten.unsqueeze.default:
        if not _is_layout(s):
            return s
        d = _dim(args[1], s.ids.dim() + 1)
        return s.derive(s.ids.unsqueeze(d), s.lead[:d] + (True,) + s.lead[d:])
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        if not _is_layout(s):
            return s
        return _view(s, _shape(src), _shape(node))
    if t in (aten.expand.default, aten.broadcast_to.default):
        return _expand(s, list(args[1])) if isinstance(s, Cols) else None
    if t is aten.select.int:
        return _select(s, args[1], args[2]) if isinstance(s, Cols) else None
    if t is aten.slice.Tensor:
        if not isinstance(s, Cols):
            return None
        dim = args[1] if len(args) > 1 else 0
        start = args[2] if len(args) > 2 else None
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        if (
            start in (None, 0)
            and (end is None or (isinstance(end, int) and end >= 2**62))
            and step in (None, 1)
        ):
            return s  # a no-op slice (x[:, :]), whatever the state
        return _slice(s, dim, start, end, step)
    if t is aten.stack.default:
        return _stack(node, states)
    if t in _NORMS:
        return _norm(s) if isinstance(s, Cols) else None
    if t is aten.index.Tensor:
        return _index(s, list(args[1]), value_of) if isinstance(s, Cols) else None
    if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int):
        return _split_like(node, s)
    if t is aten.cat.default:
        return _cat(node, states)
    if t in _REDUCE:
        derived = [states[a] for a in node.all_input_nodes if a in states]
        return Cols.union(derived) if all(isinstance(d, Cols) for d in derived) else None
    if t in _SAME:
        derived = [states[a] for a in node.all_input_nodes if a in states]
        if any(not isinstance(d, Cols) for d in derived):
            return None
        layouts = [d for d in derived if d.ids is not None]
        first = derived[0]
        same = all(
            d.ids is not None and d.lead == first.lead and torch.equal(d.ids, first.ids) for d in derived
        )
        if len(derived) == 1 or (same and layouts):
            return _broadcast(first, _shape(node))
        return Cols.union(derived)
    return None


def _cache_write(node: fx.Node, states: dict[fx.Node, object]) -> Cols | None:
    cache, dim, _, new = node.args[:4]
    written = states.get(new)
    if cache in states or not isinstance(written, Cols):
        return None
    if written.ids is None:
        return written
    d = _dim(dim, written.ids.dim())
    if written.ids.shape[d] != 1:
        return None  # written across feature columns: which column lands where is not modelled
    lead = written.lead[:d] + (True,) + written.lead[d + 1 :]  # a one-token step's sequence dim
    return written.derive(written.ids, lead)


def _split_like(node: fx.Node, s: object) -> list | None:
    if not isinstance(s, Cols) or s.ids is None:
        return None
    t, args = node.target, node.args
    n = s.ids.dim()
    if t is aten.unbind.int:
        d = _dim(args[1] if len(args) > 1 else 0, n)
        if s.lead[d]:
            return None
        return [s.derive(s.ids.select(d, i), s.lead[:d] + s.lead[d + 1 :]) for i in range(s.ids.shape[d])]
    dim = args[2] if len(args) > 2 else 0
    d = _dim(dim, n)
    if s.lead[d]:
        return None
    width = s.ids.shape[d]
    if t is aten.chunk.default:
        size = -(-width // args[1])
        sizes = [min(size, width - i) for i in range(0, width, size)]
    elif isinstance(args[1], int):
        sizes = [min(args[1], width - i) for i in range(0, width, args[1])]
    else:
        sizes = list(args[1])
    if not all(isinstance(x, int) for x in sizes) or sum(sizes) != width:
        return None
    return _split(s, d, sizes)


def _cat(node: fx.Node, states: dict[fx.Node, object]) -> Cols | None:
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    derived = [states.get(p) for p in parts if isinstance(p, fx.Node) and p in states]
    if any(not isinstance(d, Cols) for d in derived):
        return None
    everything = [states.get(p) for p in parts]
    if all(_is_layout(p) for p in everything):
        n = everything[0].ids.dim()
        d = _dim(dim, n)
        leads = {p.lead for p in everything}
        if len(leads) == 1 and not everything[0].lead[d]:
            ids = torch.cat([p.ids for p in everything], dim=d)
            return Cols.layout(ids, everything[0].lead, Cols.merged_groups(everything))
    return Cols.union(derived)


def _norm(s: Cols) -> Cols:
    """A norm over the last dim: each element stands for its whole row (Persimmon's q/k LayerNorm)."""
    if s.ids is None or s.lead[-1]:
        return Cols.union([s])
    groups = dict(s.groups)
    reps = s.ids.amin(dim=-1, keepdim=True).expand_as(s.ids)
    rows = s.ids.reshape(-1, s.ids.shape[-1]).tolist()
    new = {}
    for row in rows:
        new[min(row)] = frozenset().union(*(groups.get(i, {i}) for i in row))
    return Cols.layout(reps.contiguous(), s.lead, new)


def _stack(node: fx.Node, states: dict[fx.Node, object]) -> Cols | None:
    """``stack`` (GPT-J's and CodeGen's rotary interleave): exact when every part is a layout."""
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    derived = [states.get(p) for p in parts if isinstance(p, fx.Node) and p in states]
    if any(not isinstance(d, Cols) for d in derived):
        return None
    everything = [states.get(p) for p in parts]
    if all(_is_layout(p) for p in everything) and len({p.lead for p in everything}) == 1:
        lead = everything[0].lead
        d = _dim(dim, len(lead) + 1)
        if all(p.ids.shape == everything[0].ids.shape for p in everything):
            ids = torch.stack([p.ids for p in everything], dim=d)
            return Cols.layout(ids, lead[:d] + (False,) + lead[d:], Cols.merged_groups(everything))
    return Cols.union(derived)


def column_flow(
    start: fx.Node, width: int, is_stop, value_of, limit: int = 600
) -> tuple[dict[tuple[fx.Node, int], Cols | None], fx.Node | None]:
    """``{(stop node, operand index): Cols or None}`` for every stop op the output of ``start`` reaches,
    and the first node whose columns could not be followed (None if none).

    ``width`` is the projection's output width (the trailing dim of ``start``); ``is_stop(node)`` says
    where to stop (attention and projection ops); ``value_of(node)`` returns the constant value of a
    node (an index tensor) or None.
    """
    cone: set[fx.Node] = set()
    queue = deque([start])
    while queue and len(cone) < limit:
        n = queue.popleft()
        for u in n.users:
            if u in cone or u.op != "call_function":
                continue
            cone.add(u)
            if not is_stop(u):
                queue.append(u)
    shape = _shape(start)
    ndim = len(shape) if shape else 2
    ids = torch.arange(width, device="cpu").reshape(*([1] * (ndim - 1)), width)
    states: dict[fx.Node, object] = {start: Cols.layout(ids, (True,) * (ndim - 1) + (False,))}
    found: dict[tuple[fx.Node, int], object] = {}
    failed = None
    for node in start.graph.nodes:
        if node not in cone:
            continue
        if is_stop(node):
            for i, a in enumerate(node.args):
                if isinstance(a, fx.Node) and a in states:
                    found[(node, i)] = states[a]
            continue
        if not any(a in states for a in node.all_input_nodes):
            continue
        try:
            states[node] = _transfer(node, states, value_of)
        except (RuntimeError, IndexError, TypeError, ValueError):
            states[node] = None
        known = any(states.get(a) is not None for a in node.all_input_nodes if a in states)
        if states[node] is None and known and failed is None:
            failed = node
    return found, failed


def ranges(columns: frozenset[int]) -> tuple[tuple[int, int], ...]:
    """Sorted columns as ``(start, end)`` ranges."""
    out: list[list[int]] = []
    for c in sorted(columns):
        if out and out[-1][1] == c:
            out[-1][1] = c + 1
        else:
            out.append([c, c + 1])
    return tuple((a, b) for a, b in out)
