"""Every adapter method: one module or package each, registered in ``fxadapt.registry`` on import.

A method is a config dataclass (AdapterHub's names and defaults), its adapter modules, the graph
pass that inserts them (in ``passes/``) and its AdapterHub/PEFT tensor names, all in its own module;
adding one touches nothing else (see docs/adding-a-method.md).
"""

from __future__ import annotations

from . import (
    bottleneck,
    dora,
    ia3,
    lora,
    prefix_tuning,
    prompt_peft,  # noqa: I001  (PEFT names of prompt and prefix tuning, after both)
    prompt_tuning,
    reft,
    union,
    vera,
)

__all__ = [
    "bottleneck",
    "dora",
    "ia3",
    "lora",
    "prefix_tuning",
    "prompt_peft",
    "prompt_tuning",
    "reft",
    "union",
    "vera",
]
