"""Projection calls in an ATen graph: ``x·Wᵀ (+ b)`` in every form a model lowers it to.

- ``aten.linear(x, W, b)``, weight ``[out, in]``;
- ``aten.addmm(b, x, W)`` and ``aten.mm(x, W)``, weight ``[in, out]`` (GPT-2's ``Conv1D``);
- ``aten.matmul(x, Wᵀ)`` where ``Wᵀ`` is ``numpy_T``/``t``/``transpose``/``permute`` of a 2-D parameter
  (Falcon's ``x @ self.weight.T``), weight ``[out, in]``; ``aten.matmul(x, W)`` with ``W`` ``[in, out]``;
  a bias added right after (``+ b``) belongs to the projection;
- a grouped matmul over a 3-D expert parameter (``aten._grouped_mm``, transformers'
  ``grouped_mm_fallback``): rows of ``x`` sorted by expert, ``offs`` the cumulative row counts, weight
  ``[experts, out, in]`` read through a transpose, or ``[experts, in, out]``. Each expert is a projection.

Only parameters count as weights (a matmul with an activation or a buffer is not a projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

LINEAR = {aten.linear.default, aten.addmm.default, aten.mm.default}
MATMULS = {aten.matmul.default, aten.bmm.default}
_TRANSPOSES = {aten.numpy_T.default, aten.t.default, aten.transpose.int, aten.permute.default}


@dataclass(frozen=True)
class Call:
    """One projection call: what it reads, its weight, and the node whose output it produces."""

    node: fx.Node  # the op itself
    x: fx.Node
    weight: fx.Node  # the parameter's get_attr
    transposed: bool  # weight stored [in, out] (per expert for a grouped call)
    out: fx.Node  # the node carrying the projection's output (the bias add, if one follows)
    bias: fx.Node | None
    offs: fx.Node | None = None  # grouped calls: cumulative rows per expert

    @property
    def experts(self) -> int | None:
        shape = _shape(self.weight)
        return shape[0] if self.offs is not None and shape else None


def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(d) for d in val.shape)
    except (TypeError, RuntimeError):
        return None


def is_grouped_mm(node: fx.Node) -> bool:
    """A grouped matmul op: ``aten._grouped_mm`` or a library's equivalent (``*grouped_mm*``)."""
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "") or str(node.target)
    return "grouped_mm" in name and "backward" not in name


def _param(node: object, is_param) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and is_param(node.target)


def _through_transpose(node: object, ndim: int, is_param) -> fx.Node | None:
    """The parameter ``node`` transposes (last two dims), or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    src = node.args[0]
    if not _param(src, is_param) or len(_shape(src) or ()) != ndim:
        return None
    if node.target is aten.transpose.int:
        dims = {node.args[1] % ndim, node.args[2] % ndim}
        if dims != {ndim - 2, ndim - 1}:
            return None
    if node.target is aten.permute.default:
        perm = [d % ndim for d in node.args[1]]
        if perm != [*range(ndim - 2), ndim - 1, ndim - 2]:
            return None
    return src


def _bias_after(node: fx.Node, out_features: int, is_param) -> fx.Node | None:
    """A ``+ b`` right after a matmul projection (its only reader), with ``b`` a ``[out]`` parameter."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not aten.add.Tensor or users[0].kwargs.get("alpha", 1) != 1:
        return None
    add = users[0]
    other = [a for a in add.args[:2] if a is not node]
    if len(other) == 1 and _param(other[0], is_param) and _shape(other[0]) == (out_features,):
        return add
    return None


def projection_call(node: fx.Node, is_param) -> Call | None:
    """The projection ``node`` computes, or None; ``is_param(target)`` says a get_attr is a parameter."""
    if node.op != "call_function":
        return None
    args = node.args
    if node.target is aten.linear.default:
        if _param(args[1], is_param) and len(_shape(args[1]) or ()) == 2:
            bias = args[2] if len(args) > 2 and _param(args[2], is_param) else None
            return Call(node, args[0], args[1], False, node, bias)
        return None
    if node.target is aten.addmm.default:
        if _param(args[2], is_param):
            return Call(node, args[1], args[2], True, node, args[0] if _param(args[0], is_param) else None)
        return None
    if node.target is aten.mm.default:
        return Call(node, args[0], args[1], True, node, None) if _param(args[1], is_param) else None
    if node.target in MATMULS:
        x, w = args[0], args[1]
        if _param(x, is_param):
            return None
        src = _through_transpose(w, 2, is_param)
        transposed = src is None
        src = src if src is not None else (w if _param(w, is_param) and len(_shape(w) or ()) == 2 else None)
        if src is None:
            return None
        shape = _shape(src)
        out_features = shape[1] if transposed else shape[0]
        add = _bias_after(node, out_features, is_param)
        if add is None:
            return Call(node, x, src, transposed, node, None)
        bias = next(a for a in add.args[:2] if a is not node)
        return Call(node, x, src, transposed, add, bias)
    if is_grouped_mm(node) and len(args) >= 3:
        x, w, offs = args[0], args[1], args[2]
        src = _through_transpose(w, 3, is_param)
        transposed = src is None
        src = src if src is not None else (w if _param(w, is_param) and len(_shape(w) or ()) == 3 else None)
        if src is None or not isinstance(offs, fx.Node):
            return None
        return Call(node, x, src, transposed, node, None, offs)
    return None


def projection_input(node: fx.Node) -> fx.Node:
    """What the projection whose output is ``node`` reads (``x``), for passes that adapt it."""
    if node.target is aten.add.Tensor:  # a matmul projection's bias add
        node = next(a for a in node.args[:2] if isinstance(a, fx.Node) and a.op == "call_function")
    return node.args[1] if node.target is aten.addmm.default else node.args[0]


def expert_of_rows(offs: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each row of a grouped matmul's input (``offs``: cumulative rows per expert)."""
    return torch.searchsorted(offs.to(torch.long), torch.arange(rows, device=offs.device), right=True)
