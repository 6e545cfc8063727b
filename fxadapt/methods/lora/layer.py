"""The LoRA modules: a low-rank update beside a projection, or a learned rescaling of its output.

``LoRA`` adds ``(alpha/r) · B A x`` (one rank-``r`` block per section of a fused output); ``LoRAScale``
multiplies the output by ``(alpha/r) · b`` ((IA)^3). With ``use_gating`` (UniPELT) a gate computed
from the layer input replaces ``alpha/r``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check
from .config import LoRAConfig

Sections = tuple[tuple[tuple[int, int], ...], ...]


def block_columns(sections: Sections | None, out_features: int) -> list[torch.Tensor]:
    """The output columns of each block: one block per section (its ``(start, end)`` ranges)."""
    if not sections:
        return [torch.arange(out_features, device="cpu")]
    return [torch.cat([torch.arange(a, b, device="cpu") for a, b in spans]) for spans in sections]


def _is_whole(blocks: list[torch.Tensor], out_features: int) -> bool:
    return len(blocks) == 1 and torch.equal(blocks[0], torch.arange(out_features, device="cpu"))


class LoRA(nn.Module):
    """The low-rank update for one projection; ``sections`` are the output columns of each block.

    Each section is a tuple of ``(start, end)`` column ranges (GPT-NeoX's per-head interleaved q is
    one range per head); block ``i`` owns rows ``i·r .. (i+1)·r`` of ``lora_A`` and the rows of
    ``lora_B`` of its columns, in column order.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        sections: Sections | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        r = config.r
        blocks = block_columns(sections, out_features)
        self.out_features = out_features
        self.scaling = config.scaling
        self.sectioned = not _is_whole(blocks, out_features)
        rows = sum(len(b) for b in blocks)
        kw = dict(dtype=dtype, device=device)
        self.lora_A = nn.Parameter(torch.empty(r * len(blocks), in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(rows, r, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.sectioned:
            out_idx = torch.cat([cols.repeat_interleave(r) for cols in blocks])
            rank_idx = torch.cat(
                [torch.arange(i * r, (i + 1) * r).repeat(len(cols)) for i, cols in enumerate(blocks)]
            )
            self.register_buffer("out_idx", out_idx.to(device), persistent=False)
            self.register_buffer("rank_idx", rank_idx.to(device), persistent=False)
        self.reset_parameters(config.init_weights)
        self.gate = _gate(in_features, blocks, self, config, kw) if config.use_gating else None

    def reset_parameters(self, init: str = "lora") -> None:
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            elif init == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            elif init == "vera":  # AdapterHub's "vera" init of a LoRA module: both kaiming-uniform
                nn.init.kaiming_uniform_(self.lora_A)
                nn.init.kaiming_uniform_(self.lora_B)
            else:
                nn.init.ones_(self.lora_A)
                nn.init.ones_(self.lora_B)

    def full_B(self) -> torch.Tensor:
        """B as one ``[out, blocks·r]`` matrix: block-diagonal over the sections of a fused output."""
        if not self.sectioned:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, self.lora_A.shape[0])
        return full.index_put((self.out_idx, self.rank_idx), self.lora_B.reshape(-1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.full_B())
        if self.gate is None:
            return y + delta * self.scaling
        return y + _rowwise(delta, _gate_values(self, x if src is None else src))

    def state(
        self, x: torch.Tensor, prev: torch.Tensor | None = None, src: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The update alone, ``s·B A x``; in a ``Stack`` it reads the previous adapter's update ``prev``.

        AdapterHub chains stacked LoRAs: ``s_b B_b A_b (s_a B_a A_a x)``, so from the second one on the
        projection must be square.
        """
        delta = F.linear(F.linear(self.dropout(x if prev is None else prev), self.lora_A), self.full_B())
        if self.gate is None:
            return delta * self.scaling
        return _rowwise(delta, _gate_values(self, x if src is None else src))

    def combine(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The projection's output with an update added."""
        return y + h

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` as an ``[out, in]`` matrix, for merging."""
        return (self.full_B() @ self.lora_A) * self.scaling

    def routed(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``(A, s·B, None)``: the update as weights that per-row routing gathers (``passes/route.py``)."""
        _check_routable(self)
        return self.lora_A, self.full_B() * self.scaling, None

    def grouped(
        self, x: torch.Tensor, y: torch.Tensor, offs: torch.Tensor, op, experts: list
    ) -> torch.Tensor:
        """The update of a grouped expert matmul ``y = op(x, W, offs)``: each row meets its expert's.

        ``experts`` holds one module per expert (None where an expert has none); ``op`` is the
        graph's own grouped matmul, so the update runs as two more grouped matmuls.
        """
        a = torch.stack([m.lora_A if m is not None else torch.zeros_like(self.lora_A) for m in experts])
        b = torch.stack([m.full_B() if m is not None else torch.zeros_like(self.full_B()) for m in experts])
        h = op(self.dropout(x).to(a.dtype), a.transpose(1, 2).contiguous(), offs)
        return y + (op(h, b.transpose(1, 2).contiguous(), offs) * self.scaling).to(y.dtype)


class LoRAScale(nn.Module):
    """A learned per-output-column scale ``y ⊙ (alpha/r) · b``; columns outside ``sections`` keep 1."""

    def __init__(
        self,
        out_features: int,
        config: LoRAConfig,
        sections: Sections | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        blocks = block_columns(sections, out_features)
        self.out_features = out_features
        self.scaling = config.scaling
        self.sectioned = not _is_whole(blocks, out_features)
        rows = sum(len(b) for b in blocks)
        self.lora_B = nn.Parameter(torch.empty(rows, 1, dtype=dtype, device=device))
        if self.sectioned:
            idx = torch.cat(blocks)
            self.register_buffer("out_idx", idx.to(device), persistent=False)
        with torch.no_grad():
            if config.init_weights == "ia3":
                nn.init.ones_(self.lora_B)
            elif config.init_weights == "bert":
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                nn.init.zeros_(self.lora_B)
        self.gate = None
        if config.use_gating:
            check(in_features is not None, "a gated (IA)^3 vector needs the projection's in_features")
            self.gate = _gate(in_features, blocks, self, config, dict(dtype=dtype, device=device))

    def vector(self, scaled: bool = True) -> torch.Tensor:
        """The ``[out]`` scale applied to the projection's output."""
        scale = self.lora_B.reshape(-1) * (self.scaling if scaled else 1.0)
        if not self.sectioned:
            return scale
        return scale.new_ones(self.out_features).index_put((self.out_idx,), scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        if self.gate is None:
            return y * self.vector()
        return _rowwise(y * self.vector(scaled=False), _gate_values(self, x if src is None else src))

    def state(
        self, x: torch.Tensor, prev: torch.Tensor | None = None, src: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The scale alone; in a ``Stack`` the scales multiply (AdapterHub's (IA)^3 composition)."""
        if self.gate is None:
            vec = self.vector()
        else:
            ref = x.new_ones(*x.shape[:-1], self.out_features)
            vec = _rowwise(ref * self.vector(scaled=False), _gate_values(self, x if src is None else src))
        return vec if prev is None else prev * vec

    def combine(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The projection's output with a scale applied."""
        return y * h

    def routed(self) -> tuple[None, None, torch.Tensor]:
        """``(None, None, v)``: the scale as a vector that per-row routing gathers (``passes/route.py``)."""
        _check_routable(self)
        return None, None, self.vector()

    def grouped(
        self, x: torch.Tensor, y: torch.Tensor, offs: torch.Tensor, op, experts: list
    ) -> torch.Tensor:
        """Per-expert scales on a grouped expert matmul's output rows (rows past the last expert keep 1)."""
        ones = torch.ones_like(self.vector())
        table = torch.stack([m.vector() if m is not None else ones for m in experts] + [ones])
        rows = torch.arange(y.shape[0], device=y.device)
        expert = torch.searchsorted(offs.to(torch.long), rows, right=True).clamp(max=len(experts))
        return y * table.index_select(0, expert).to(y.dtype)


def _check_routable(module: nn.Module) -> None:
    if module.gate is not None:
        raise ValueError(
            "a gated LoRA/(IA)^3 (use_gating=True) scales its update by a gate on each row's input, "
            "so it cannot be routed per row by gathering weights"
        )


def _gate(
    in_features: int, blocks: list[torch.Tensor], owner: nn.Module, config: LoRAConfig, kw: dict
) -> nn.Linear:
    """UniPELT's gate (AdapterHub's ``use_gating``): one logit per adapted block, from the layer input.

    A gated module's update is multiplied by ``mean_seq(sigmoid(gate(x)))`` instead of ``alpha/r``.
    ``head_idx`` maps each output column to its block's gate; columns outside every block read a
    constant 1 (index ``heads``).
    """
    heads = len(blocks) if owner.sectioned else 1
    gate = nn.Linear(in_features, heads, **kw)
    with torch.no_grad():
        nn.init.normal_(gate.weight, std=0.02)
    if owner.sectioned:
        idx = torch.full((owner.out_features,), heads, dtype=torch.long)
        for i, cols in enumerate(blocks):
            idx[cols] = i
        owner.register_buffer("head_idx", idx.to(kw.get("device")), persistent=False)
    return gate


def _gate_values(owner: nn.Module, src: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, out or 1]`` gate values from the layer input ``src`` (batch, seq, features)."""
    src = src if src.dim() >= 3 else src.unsqueeze(0)
    g = torch.sigmoid(owner.gate(src)).mean(dim=1)
    if owner.sectioned:
        g = torch.cat([g, g.new_ones(g.shape[0], 1)], dim=-1).index_select(-1, owner.head_idx)
    return g.unsqueeze(1)


def _rowwise(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t * g`` per batch row; ``t`` may be (batch, seq, out) or flattened to (batch·seq, out)."""
    if t.dim() == g.dim():
        return t * g
    return (t.reshape(g.shape[0], -1, t.shape[-1]) * g).reshape(t.shape)
