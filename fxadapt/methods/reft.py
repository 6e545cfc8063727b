"""ReFT: low-rank interventions on the hidden representations at a few token positions (Wu et al., 2024).

Config names and defaults follow AdapterHub's ``ReftConfig`` and its presets ``LoReftConfig``
(``"loreft"``), ``NoReftConfig`` (``"noreft"``) and ``DiReftConfig`` (``"direft"``). As in AdapterHub,
the intervention acts on the output of each chosen transformer layer (the residual stream after the
layer, ``passes/reft.py``), at the first ``prefix_positions`` and the last ``suffix_positions`` real
tokens of each row. AdapterHub 1.3's rule, from the call's attention mask: a row's offset is
``mask.argmax(1)`` (its first 1) and its length ``(mask == 1).sum(-1)``; the prefix positions are
``offset + 0 .. offset + prefix_positions - 1`` and the suffix positions ``offset + length -
suffix_positions .. offset + length - 1``. So with right padding the suffix is the last real tokens
(not padding), and with left padding the prefix starts at the first real token. Where prefix and
suffix overlap (a row shorter than prefix + suffix) the suffix's result wins, as in AdapterHub. A
position outside the sequence (a row with fewer real tokens than ``suffix_positions`` under right
padding, or than ``prefix_positions`` under left padding) is left alone; AdapterHub fails there with
an index error. Without an attention mask (none passed, or a decoder layer whose own mask was not
passed: AdapterHub would apply the encoder's offsets there) the positions are the first and last of
the sequence. Each position's state ``h`` becomes

    h + Rᵀ(act(W h + b) − R h)      (subtract_projection, LoReFT / NoReFT)
    h + Rᵀ act(W h + b)             (DiReFT)

followed by dropout of the whole result (AdapterHub's order), with ``R`` (``r × hidden``) kept
orthonormal by ``torch.nn.utils.parametrizations.orthogonal`` when ``orthogonality`` (LoReFT).
Prefix and suffix have a unit each, or share one (``tied_weights``). Parameter names are
AdapterHub's (``units.<i>.learned_source.*``, ``units.<i>.projection[.parametrizations.weight.*]``).

A ``Stack`` applies interventions one after another; ``BatchSplit``/``Parallel`` give each block of
rows its own (docs/composition.md).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from passes.reft import insert_reft
from passes.sites import SiteTable

from ..config import AdapterConfig, check
from ..formats.keys import split_site_key
from ..registry import Method, register
from .activations import Activation, activation_names
from .bottleneck.sites import locations


@dataclasses.dataclass
class ReftConfig(AdapterConfig):
    """AdapterHub's ``ReftConfig`` (its defaults are LoReFT's)."""

    architecture = "reft"
    foreign_defaults = {"output_reft": True, "init_weights_seed": None}
    # AdapterHub's ReftConfig declares subtract_projection without a type: no dataclass field, so its
    # files cannot hold it and a load always uses True (its own DiReFT files lose it too)
    local_options = {"subtract_projection": True}

    layers: str | list[int] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None
    dtype: str | None = None

    def validate(self) -> None:
        name = type(self).__name__

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        layers = self.layers
        check(
            layers == "all"
            or (isinstance(layers, (list, tuple)) and all(is_int(i) and i >= 0 for i in layers)),
            f"{name}.layers must be 'all' or a list of layer indices >= 0, got {layers!r}",
        )
        for opt in ("prefix_positions", "suffix_positions"):
            v = getattr(self, opt)
            check(is_int(v) and v >= 0, f"{name}.{opt} must be an int >= 0, got {v!r}")
        check(
            self.prefix_positions + self.suffix_positions >= 1,
            f"{name}: prefix_positions + suffix_positions must be >= 1 (no position would be adapted)",
        )
        check(is_int(self.r) and self.r >= 1, f"{name}.r must be an int >= 1, got {self.r!r}")
        for opt in ("orthogonality", "tied_weights", "subtract_projection"):
            v = getattr(self, opt)
            check(isinstance(v, bool), f"{name}.{opt} must be a bool, got {v!r}")
        d = self.dropout
        check(
            isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1,
            f"{name}.dropout must be in [0, 1), got {d!r}",
        )
        act = self.non_linearity
        check(
            act is None or (isinstance(act, str) and act.lower() in activation_names()),
            f"{name}.non_linearity {act!r} is not known; valid: None or one of {activation_names()}",
        )
        check(
            self.dtype is None
            or (isinstance(self.dtype, str) and isinstance(getattr(torch, self.dtype, None), torch.dtype)),
            f"{name}.dtype must be None or a torch dtype name such as 'float32', got {self.dtype!r}",
        )
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    def torch_dtype(self) -> torch.dtype | None:
        if self.dtype is None:
            return None
        dtype = getattr(torch, self.dtype)
        check(dtype.is_floating_point, f"{type(self).__name__}.dtype must be a floating dtype, got {dtype}")
        return dtype


@dataclasses.dataclass
class LoReftConfig(ReftConfig):
    """Low-rank linear subspace ReFT: orthonormal ``R``, ``h + Rᵀ(W h + b − R h)``."""


@dataclasses.dataclass
class NoReftConfig(ReftConfig):
    """LoReFT without the orthogonality constraint on ``R``."""

    orthogonality: bool = False


@dataclasses.dataclass
class DiReftConfig(ReftConfig):
    """NoReFT without subtracting the projection: ``h + Rᵀ(W h + b)``."""

    orthogonality: bool = False
    subtract_projection: bool = False


class ReftUnit(nn.Module):
    """One intervention ``x + Rᵀ(act(W x + b) [− R x])``, then dropout."""

    def __init__(self, hidden: int, config: ReftConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.orthogonal = config.orthogonality
        self.subtract_projection = config.subtract_projection
        self.learned_source = nn.Linear(hidden, config.r, bias=True, dtype=dtype)
        projection = nn.Linear(hidden, config.r, bias=False, dtype=dtype)
        if config.orthogonality:
            projection = nn.utils.parametrizations.orthogonal(projection)
        self.projection = projection
        self.non_linearity = Activation(config.non_linearity)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.projection.weight  # [r, hidden]; computed once per call when parametrized
        source = self.non_linearity(self.learned_source(x))
        if self.subtract_projection:
            source = source - F.linear(x, r)
        return self.dropout(x + source @ r)


class ReftIntervention(nn.Module):
    """The intervention at one layer's output: units on the prefix and suffix positions.

    ``forward(h, bounds)``: ``bounds`` ``[B, 2]`` holds each row's first real position and the end of
    its real tokens (``passes.reft.real_token_bounds``); without it, the first and last positions of
    the sequence. Tensor ops only (gather/scatter on positions computed from ``bounds``, slices
    without), so any batch size and sequence length run in one graph under ``torch.compile``. The
    prefix is written first and the suffix over it, so where they overlap the suffix's result wins,
    as with AdapterHub's scatter order.
    """

    def __init__(self, hidden: int, config: ReftConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.prefix_positions = config.prefix_positions
        self.suffix_positions = config.suffix_positions
        self.tied_weights = config.tied_weights
        n_units = 1 if config.tied_weights else 2
        self.units = nn.ModuleList([ReftUnit(hidden, config, dtype) for _ in range(n_units)])

    def _adapt(self, states: torch.Tensor) -> torch.Tensor:
        """The units on ``[B, prefix + suffix, H]`` gathered states (prefix first)."""
        dtype = self.units[0].learned_source.weight.dtype
        x = states.to(dtype)
        if self.tied_weights:
            adapted = self.units[0](x)
        else:
            p = self.prefix_positions
            adapted = torch.cat([self.units[0](x[:, :p]), self.units[1](x[:, p:])], dim=1)
        return adapted.to(states.dtype)

    def forward(self, h: torch.Tensor, bounds: torch.Tensor | None = None) -> torch.Tensor:
        if bounds is None:
            return self._at_sequence_ends(h)
        p, s = self.prefix_positions, self.suffix_positions
        b, n, d = h.shape
        steps = []
        if p:
            steps.append(bounds[:, :1] + torch.arange(p, device=h.device))
        if s:
            steps.append(bounds[:, 1:] + torch.arange(-s, 0, device=h.device))
        positions = torch.cat(steps, dim=1)  # [B, p + s]
        # a position outside the sequence reads and writes a spare slot n, dropped at the end
        positions = torch.where((positions >= 0) & (positions < n), positions, n)
        index = positions.unsqueeze(-1).expand(-1, -1, d)
        out = torch.cat([h, h.new_zeros(b, 1, d)], dim=1)
        adapted = self._adapt(out.gather(1, index))
        if p:
            out = out.scatter(1, index[:, :p], adapted[:, :p])
        if s:
            out = out.scatter(1, index[:, p:], adapted[:, p:])
        return out[:, :n]

    def _at_sequence_ends(self, h: torch.Tensor) -> torch.Tensor:
        """The first ``prefix`` and last ``suffix`` positions of the sequence: slices (any ``S >= max(p, s)``)."""
        p, s = self.prefix_positions, self.suffix_positions
        n = h.shape[1]
        suffix = h[:, n - s :] if s else h[:, :0]
        adapted = self._adapt(torch.cat([h[:, :p], suffix], dim=1))
        if p:
            h = h.slice_scatter(adapted[:, :p], dim=1, start=0, end=p)
        if s:
            h = h.slice_scatter(adapted[:, adapted.shape[1] - s :], dim=1, start=n - s, end=n)
        return h


# Stack: one intervention after another; a row block gets its own (passes/reft.py)
COMPOSE = frozenset({"stack", "rows"})


def build(config: ReftConfig, sites: SiteTable, dtype: torch.dtype, device: Any) -> dict[str, nn.Module]:
    name = type(config).__name__
    outputs = [loc for loc in locations(sites) if loc.kind == "output_adapter"]
    check(bool(outputs), f"{name}: no FFN output projection ('ffn_out' site) found; see model.sites()")
    if config.layers != "all":
        present = {loc.layer for loc in outputs}
        absent = sorted(set(config.layers) - present)
        check(not absent, f"{name}.layers {absent} are not in this model; its layers are 0..{max(present)}")
        outputs = [loc for loc in outputs if loc.layer in config.layers]
    unit_dtype = config.torch_dtype() or dtype
    modules: dict[str, nn.Module] = {}
    for loc in outputs:
        hidden = loc.site.out_features
        check(
            config.r <= hidden,
            f"{name}.r={config.r} is larger than the hidden size {hidden} of layer {loc.layer}",
        )
        modules[loc.site.key] = ReftIntervention(hidden, config, unit_dtype).to(device=device)
    return modules


_AH_KEY = re.compile(r"^(?P<path>.+)\.reft_layer\.refts\.(?P<name>[^.]+)\.(?P<param>.+)$")


def adapterhub_key(key: str, sites: Any, config: Any = None) -> str | None:
    """``<layer path>.reft_layer.refts.<name>.<param>`` -> ``<ffn_out site of that layer>.<param>``."""
    m = _AH_KEY.match(key)
    if m is None:
        return None
    parts = m["path"].split(".")
    keys = [loc.site.key for loc in locations(sites) if loc.kind == "output_adapter"]
    for i in range(len(parts)):  # the longest tail of the layer path that starts site keys
        tail = ".".join(parts[i:]) + "."
        hits = [k for k in keys if k.startswith(tail) or ("." + tail) in ("." + k)]
        if len(hits) == 1:
            return f"{hits[0]}.{m['param']}"
        if hits:
            return None
    return None


def adapterhub_name(key: str, sites: Any, config: Any, name: str) -> str:
    """``<ffn_out site>.<param>`` -> ``<layer>.reft_layer.refts.<name>.<param>``, the inverse of ``adapterhub_key``."""
    outputs = {loc.site.key: loc for loc in locations(sites) if loc.kind == "output_adapter"}
    site_key, param = split_site_key(key, outputs)
    site = outputs[site_key].site
    return f"{site.stack}.{site.layer}.reft_layer.refts.{name}.{param}"


def _register(name: str, config: type[ReftConfig]) -> Method:
    return register(
        Method(
            name,
            config,
            build,
            insert_reft,
            None,
            adapterhub_key,
            adapterhub_name=adapterhub_name,
            compose=COMPOSE,
            prompt_only=True,
        )
    )


REFT = _register("reft", ReftConfig)
LOREFT = _register("loreft", LoReftConfig)
NOREFT = _register("noreft", NoReftConfig)
DIREFT = _register("direft", DiReftConfig)
