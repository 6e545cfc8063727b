"""How a built graph is handed to ``torch.compile``: per layer shape (regional) or whole.

``compile=True`` means regional compilation: each distinct layer shape is traced and compiled once
and reused for every layer of that shape (``passes.regions``), so a cold start compiles a fraction
of the model while a step runs the same kernels. ``compile="whole"`` compiles the whole graph as one
(inductor may then fuse across layer boundaries). Graphs whose layers were moved into checkpointed
sub-graphs, and generation's graphs (which mark their own static dims), always compile whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from passes.cleanup import clone
from passes.regions import regionalize

from . import cache
from .errors import ConfigError

MODES = ("regional", "whole")


def compile_mode(value: Any) -> str | None:
    """The compile mode of ``AdaptedModel(compile=...)``: None (eager), "regional" or "whole"."""
    if value is False or value is None:
        return None
    if value is True:
        return "regional"
    if isinstance(value, str) and value in MODES:
        return value
    raise ConfigError(
        f"compile={value!r} is not a compile mode: pass True (regional compilation, the default), "
        f"False (eager), or one of {', '.join(repr(m) for m in MODES)}"
    )


def compile_graph(gm: fx.GraphModule, mode: str | None, options: dict[str, Any], whole: bool = False) -> Any:
    """The callable that runs ``gm``: itself (eager), a copy with its layers compiled, or ``gm`` compiled."""
    if mode is None:
        return gm
    options = {"dynamic": True, **options}
    checkpointed = any((n.meta.get("fxadapt") or {}).get("kind") == "checkpoint" for n in gm.graph.nodes)
    if mode == "whole" or whole or checkpointed:
        return torch.compile(gm, **options)
    regional = fx.GraphModule(gm, clone(gm.graph), class_name="RegionalGraph")  # gm stays inspectable
    regional.meta["regions"] = regionalize(regional, lambda function: torch.compile(function, **options))
    return regional


def artefact_key(model: nn.Module, mode: str | None, options: dict[str, Any]) -> str | None:
    """The disk-cache key of this model's compiled artefacts (loaded now if stored), or None (eager, cache off)."""
    if mode is None or cache.folder() is None:
        return None
    key = cache.digest(
        {"model": cache.model_key(model), "mode": mode, "options": repr(sorted(options.items()))}
    )
    cache.load_compiled(key)
    return key
