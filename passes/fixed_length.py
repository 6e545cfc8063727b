"""Sequence lengths that are numbers, not symbols, in a captured graph (a vision model's patch sequence).

A pass that lengthens the sequence (prompt tuning) finds ``S`` in the size arguments of the ops that
build tensors: ``view``/``reshape``/``expand`` shapes, ``arange``'s end, ``zeros``/``full`` sizes. A size
counts as the sequence length where the op's recorded output has that length at the same position. A
number is recognised by its value, so a graph where a projection has the same width is refused.
"""

from __future__ import annotations

import torch
from torch import fx

from .sites import Site

aten = torch.ops.aten

_SIZED = {
    aten.view.default: 1,
    aten.reshape.default: 1,
    aten._unsafe_view.default: 1,
    aten.expand.default: 1,
    aten.new_zeros.default: 1,
    aten.new_ones.default: 1,
    aten.new_empty.default: 1,
    aten.new_full.default: 1,
    aten.zeros.default: 0,
    aten.ones.default: 0,
    aten.empty.memory_format: 0,
    aten.full.default: 0,
}


def fixed_sizes(node: fx.Node, length: int) -> list[int]:
    """Where ``node``'s size argument holds the sequence length ``length`` (positions in its shape list;
    ``[-1]`` for ``arange``'s end), judged by its output: a size that is ``length`` there too."""
    if node.op != "call_function":
        return []
    if node.target is aten.arange.default:
        return [-1] if node.args[0] == length else []
    if node.target is aten.arange.start:
        return [-1] if len(node.args) > 1 and node.args[1] == length and node.args[0] == 0 else []
    if node.target not in _SIZED or len(node.args) <= _SIZED[node.target]:
        return []
    shape, out = node.args[_SIZED[node.target]], node.meta.get("val")
    if not isinstance(shape, (list, tuple)) or not isinstance(out, torch.Tensor) or len(shape) != out.dim():
        return []
    found = [
        i
        for i, d in enumerate(shape)
        if isinstance(d, int) and not isinstance(d, bool) and d == length and _is(out.shape[i], length)
    ]
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    shape_in = source.shape if isinstance(source, torch.Tensor) else ()
    before = [i for i, d in enumerate(shape_in) if _is(d, length)]
    # [B, S, W] -> [B, S, heads, head_dim] with S equal to heads or head_dim: which one is the sequence?
    # ([S·S, H] -> [S, S, H], a table of position pairs, holds S twice and no doubt)
    splits = isinstance(source, torch.Tensor) and source.dim() < out.dim() and bool(before)
    if len(found) > len(before) and splits:
        raise ValueError(
            f"prompt tuning cannot lengthen a fixed sequence of {length} positions: {node.format_node()} "
            f"splits a dim into sizes that include {length} more than once, so the sequence cannot be told apart"
        )
    return found


def lengthen_sizes(node: fx.Node, original: fx.Node, length: int, new_seq: fx.Node) -> None:
    """Put ``new_seq`` where ``original``'s size arguments hold the sequence length."""
    positions = fixed_sizes(original, length)
    if not positions:
        return
    args = list(node.args)
    if positions == [-1]:
        args[0 if node.target is aten.arange.default else 1] = new_seq
    else:
        k = _SIZED[node.target]
        shape = list(args[k])
        for i in positions:
            shape[i] = new_seq
        args[k] = shape
    node.args = tuple(args)


def has_length(node: fx.Node, length: int | None) -> bool:
    """A tensor with a dim of the fixed sequence length (which nothing re-derives)."""
    val = node.meta.get("val")
    if length is None or not isinstance(val, torch.Tensor):
        return False
    return any(isinstance(d, int) and d == length for d in val.shape)


def check_fixed_length(length: int, sites: list[Site]) -> None:
    """A fixed sequence length is recognised by its value: refuse where another size has that value."""
    widths = {w for s in sites for w in (s.in_features, s.out_features) if w}
    if length in widths:
        raise ValueError(
            f"prompt tuning cannot lengthen a fixed sequence of {length} positions: a projection of the model "
            f"has that width too, so the graph's sizes cannot be told apart"
        )


def _is(size: object, length: int) -> bool:
    """A recorded size that is the number ``length`` (a symbol is not, and gets no guard)."""
    return isinstance(size, int) and size == length
