"""Per-row adapter routing: ``model(**batch, adapter_names=["a", "b", None])``, PEFT's mixed batch.

The routed graph holds every *routable* adapter of the model, in the model's order (``Route``), and
reads each row's adapter from a graph input (``passes.compose.ROUTE_INPUT``): a new assignment of
rows runs the same graph, compiled once. What each method's pass emits for it is in
``passes/route.py``; docs/composition.md ("Per-row routing") has the semantics and the costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from passes.compose import ROUTE_INPUT

from ..adapter import Adapter
from ..errors import ConfigError
from .blocks import AdapterCompositionBlock

BASE_NAMES = (None, "__base__")  # a row without adapter: None, or PEFT's "__base__"


class Route(AdapterCompositionBlock):
    """Every routable adapter, in the model's order: row ``i`` runs the one its index names, or none.

    Not a block users set active: it is the setup of the routed graph, so the graph cache holds
    one routed graph per set of adapters, whatever the rows ask for.
    """


def why_not_routable(adapter: Adapter) -> str | None:
    """Why ``adapter`` cannot be routed per row (a sentence naming its method), or None if it can."""
    for method, config, _ in adapter.parts():
        if "route" not in method.compose:
            return (
                f"{method.name} has no per-row form (routable: LoRA, (IA)^3, bottleneck adapters, prefix "
                "tuning and unions of them)"
            )
        if getattr(config, "use_gating", False) and getattr(config, "architecture", None) == "lora":
            return (
                f"its {method.name} part is gated (use_gating=True): the gate scales each row's update by "
                "the row's input, which a gathered-weights router does not compute"
            )
    return None


def routable(adapters: Any) -> list[str]:
    """The names of the adapters a routed graph holds, in the model's order."""
    return [name for name, adapter in adapters.items() if why_not_routable(adapter) is None]


def route_call(
    adapters: Any,
    adapter_names: Any,
    tensors: dict[str, torch.Tensor],
    training: bool,
    merged: Sequence[str],
) -> tuple[Route, torch.Tensor]:
    """The routed setup and the index input for one call, after every check (nothing has run yet)."""
    if training:
        raise ConfigError(
            "adapter_names= routes rows to adapters at inference only (PEFT refuses it in training "
            "too): call model.eval() first; to train several adapters on one batch use BatchSplit"
        )
    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
        raise ConfigError(
            f"adapter_names must be a list with one adapter name (or None) per row, got {adapter_names!r}"
        )
    names = list(adapter_names)
    rows = _batch_size(tensors)
    if rows is not None and len(names) != rows:
        raise ConfigError(
            f"adapter_names has {len(names)} names but the batch has {rows} rows: give one name (or None "
            "for the base model) per row"
        )
    wanted = [n for n in dict.fromkeys(names) if n not in BASE_NAMES]
    bad_type = [n for n in wanted if not isinstance(n, str)]
    if bad_type:
        raise ConfigError(f"adapter_names holds {bad_type}: each entry must be an adapter name or None")
    unknown = [n for n in wanted if n not in adapters]
    if unknown:
        raise ConfigError(f"no adapter named {unknown}; adapters: {list(adapters)}")
    for name in wanted:
        reason = why_not_routable(adapters[name])
        if reason is not None:
            raise ConfigError(
                f"adapter {name!r} cannot be routed per row: {reason}. Run it with set_active_adapters(), "
                "or give its rows their own call"
            )
    if merged:
        raise ConfigError(
            f"adapter(s) {list(merged)} are merged into the base weights, so every row would run them: "
            "reset_adapter() before routing rows with adapter_names= (PEFT refuses it after merging too)"
        )
    order = routable(adapters)
    position = {n: i for i, n in enumerate(order)}
    device = next(iter(tensors.values())).device if tensors else None
    index = torch.tensor([position.get(n, len(order)) for n in names], dtype=torch.long, device=device)
    return Route(*order), index


def route_inputs(index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The graph inputs a routed call adds to the model's own."""
    return {ROUTE_INPUT: index}


def _batch_size(tensors: dict[str, torch.Tensor]) -> int | None:
    ref = next((t for k, t in tensors.items() if k in ("input_ids", "inputs_embeds")), None)
    ref = ref if ref is not None else next((t for t in tensors.values() if t.dim() > 0), None)
    return None if ref is None else int(ref.shape[0])
