"""AdapterDrop (``skip_layers``): fixed layers removed from the graph, or a per-layer keep mask in training.

With a fixed setting outside training the nodes of the skipped layers are not inserted at all, which
saves their compute. In training AdapterHub's recipe draws new ``skip_layers`` every step; there
the skipped layers are a graph input (``passes.compose.KEEP_INPUT``, one bool per layer), so every
step runs the same graph and a compiled model compiles once. See docs/composition.md ("AdapterDrop").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from passes.compose import KEEP_INPUT

TENSOR = "skip_layers as a graph input"  # the runner key's skip part when skipping is a tensor


@dataclass
class Drop:
    """What a graph skips: fixed ``layers`` (removed), or ``tensor`` (read from the keep input).

    ``layer_of`` maps a site key to its layer over the whole model (encoder layers first).
    """

    layers: frozenset[int] = frozenset()
    tensor: bool = False
    layer_of: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, skip: frozenset[int] | str, layer_of: dict[str, int]) -> Drop:
        if skip == TENSOR:
            return cls(frozenset(), True, layer_of)
        return cls(frozenset(skip), False, layer_of)

    @property
    def active(self) -> bool:
        return self.tensor or bool(self.layers)

    def skips(self, key: str) -> bool:
        return self.layer_of.get(key) in self.layers


def runner_skip(
    skip: frozenset[int], setup_names: list[str], adapters: Any, layer_of: dict[str, int]
) -> frozenset[int] | str:
    """The skip part of a training graph's cache key: ``TENSOR``, or the layers themselves.

    Every method of the setup that sits in layers must read the keep input; if one cannot, its
    layers are removed as in inference (a graph per setting) and a warning says so.
    """
    lacking = sorted(
        {
            method.name
            for name in setup_names
            for method, _, keys in adapters[name].parts()
            if "drop" not in method.compose and any(layer_of.get(k) is not None for k in keys)
        }
    )
    if lacking:
        warnings.warn(
            f"AdapterDrop in training: {', '.join(lacking)} cannot skip layers through a graph input, so "
            "each different skip_layers builds (and compiles) its own graph",
            stacklevel=4,
        )
        return skip
    return TENSOR


def keep_inputs(
    input_names: tuple[str, ...], skip: frozenset[int], layer_of: dict[str, int], device: Any
) -> dict[str, torch.Tensor]:
    """The keep input (False for each skipped layer) if the graph reads one."""
    if KEEP_INPUT not in input_names:
        return {}
    keep = torch.ones(max(layer_of.values(), default=-1) + 1, dtype=torch.bool, device=device)
    if skip:
        keep[sorted(skip)] = False
    return {KEEP_INPUT: keep}
