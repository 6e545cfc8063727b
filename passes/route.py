"""Per-row adapter routing (PEFT's mixed batch): the functions the routed graph calls.

Row ``i`` of a batch runs adapter ``index[i]`` of a fixed list of adapters, or none (index
``len(list)``). ``index`` is a graph input, so a new assignment of rows runs the same graph.

- LoRA and (IA)^3 gather weights, Punica/S-LoRA style: every adapter's ``A`` and ``s·B`` are padded to
  the largest rank and stacked, each row takes its own by index, and two batched matmuls compute
  every row's update at once; (IA)^3 vectors are stacked and gathered the same way.
- Bottleneck adapters (and invertible ones) run on every row and each row keeps its own result
  (``select_rows``): the cost is one adapter per routed adapter on the whole batch.
- Prefix tuning: each row gets its adapter's prefix, padded to the longest one, with the padded
  slots hidden from attention (``route_prefix`` returns which slots are real).

The functions also serve AdapterDrop as a tensor (``keep_valid``) and are plain torch, so eager
and compiled graphs compute the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(t: torch.Tensor, b: int) -> torch.Tensor:
    """``t`` as ``[b, tokens, features]``: a flattened ``[b·S, features]`` (GPT-2's Conv1D) is unflattened."""
    return t.reshape(b, -1, t.shape[-1])


def route_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    *weights: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None,
) -> torch.Tensor:
    """The projection's output ``y`` with each row's adapter: ``y ⊙ v_i + x A_iᵀ (s_i B_i)ᵀ``.

    ``weights[i]`` is adapter ``i``'s ``(A [r, in], s·B [out, r], v [out])`` (``None`` parts: not that
    kind; ``None``: no module at this site). Rows of index ``len(weights)`` keep ``y``.
    """
    b = index.shape[0]
    scales = [w[2] if w is not None else None for w in weights]
    if any(v is not None for v in scales):
        ones = y.new_ones(y.shape[-1])
        table = torch.stack([ones if v is None else v.to(y.dtype) for v in scales] + [ones])
        y = (_rows(y, b) * table.index_select(0, index).unsqueeze(1)).reshape(y.shape)
    lows = [(w[0], w[1]) if w is not None and w[0] is not None else None for w in weights]
    present = [p for p in lows if p is not None]
    if not present:
        return y
    rank = max(a.shape[0] for a, _ in present)
    a0, b0 = present[0]
    zero_a = a0.new_zeros(rank, a0.shape[1])
    zero_b = b0.new_zeros(b0.shape[0], rank)
    stack_a = torch.stack(
        [zero_a if p is None else F.pad(p[0], (0, 0, 0, rank - p[0].shape[0])) for p in lows] + [zero_a]
    )
    stack_b = torch.stack(
        [zero_b if p is None else F.pad(p[1], (0, rank - p[1].shape[1])) for p in lows] + [zero_b]
    )
    low = torch.bmm(_rows(x, b).to(a0.dtype), stack_a.index_select(0, index).transpose(1, 2))
    delta = torch.bmm(low, stack_b.index_select(0, index).transpose(1, 2))
    return y + delta.reshape(y.shape).to(y.dtype)


def select_rows(index: torch.Tensor, *outs: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``outs[index[i]]``: the outputs hold the same rows (flattened ``[B·S, ...]`` too)."""
    b = index.shape[0]
    picked = outs[-1].reshape(b, -1)
    for i, out in enumerate(outs[:-1]):
        picked = torch.where((index == i).unsqueeze(1), out.reshape(b, -1), picked)
    return picked.reshape(outs[0].shape)


def route_prefix(
    index: torch.Tensor, *pairs: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Each row's prefix keys and values ``[B, P, W]`` (``P`` the longest), and which slots are real ``[B, P]``.

    ``pairs`` are ``k_0, v_0, k_1, v_1, ...``: adapter ``i``'s ``[B, P_i, W]`` keys and values, or
    ``None`` where it has no prefix in this layer. ``(None, None, None)`` if no adapter has one.
    """
    keys, values = pairs[0::2], pairs[1::2]
    present = [i for i, k in enumerate(keys) if k is not None]
    if not present:
        return None, None, None
    ref = keys[present[0]]
    b = index.shape[0]
    n = max(keys[i].shape[1] for i in present)
    pk = ref.new_zeros(b, n, ref.shape[-1])
    pv = ref.new_zeros(b, n, ref.shape[-1])
    valid = torch.zeros(b, n, dtype=torch.bool, device=index.device)
    slots = torch.arange(n, device=index.device)
    for i in present:
        row = index == i
        length = keys[i].shape[1]
        k = F.pad(keys[i], (0, 0, 0, n - length)).to(pk.dtype)
        v = F.pad(values[i], (0, 0, 0, n - length)).to(pv.dtype)
        pk = torch.where(row.view(b, 1, 1), k, pk)
        pv = torch.where(row.view(b, 1, 1), v, pv)
        valid = valid | (row.unsqueeze(1) & (slots < length).unsqueeze(0))
    return pk, pv, valid


def keep_valid(
    keep: torch.Tensor, layer: int, p: torch.Tensor | None, valid: torch.Tensor | None
) -> torch.Tensor | None:
    """AdapterDrop for a prefix: its slots ``[B, P]`` are real only if layer ``layer`` keeps its adapters."""
    if p is None:
        return valid
    kept = keep[layer].expand(p.shape[0], p.shape[1])
    return kept if valid is None else valid & kept


def _columns(valid: torch.Tensor, keys: int) -> torch.Tensor:
    """``[B, keys]``: the prefix slots' validity, then the real keys (all True)."""
    return torch.cat([valid, valid.new_ones(valid.shape[0], keys - valid.shape[1])], dim=-1)


def hide_prefix(mask: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``mask`` (``[..., Sq, P+S]``: bool visibility, additive float mask or scores) with unreal prefix slots hidden."""
    if valid is None:
        return mask
    cols = _columns(valid, mask.shape[-1])
    b, keys = cols.shape
    cols = cols.view(b, 1, keys) if mask.dim() == 3 else cols.view(b, 1, 1, keys)
    if mask.dtype == torch.bool:
        return mask & cols
    return mask.masked_fill(~cols, torch.finfo(mask.dtype).min)


def prefix_mask(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean SDPA mask ``[B, 1, 1, P+S]`` for attention that had none: real prefix slots and every key."""
    if valid is None:
        return None
    return _columns(valid, keys.shape[-2]).view(valid.shape[0], 1, 1, -1)
