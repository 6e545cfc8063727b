"""(IA)^3: learned rescaling of keys, values and the FFN's intermediate activations (Liu et al., 2022).

As in AdapterHub, it is LoRA in ``composition_mode="scale"``: the same pass inserts the module after
each projection, the module multiplies the output by a learned vector, merging scales the weight's
rows (and the bias).
"""

from __future__ import annotations

import dataclasses

from passes.lora import insert_lora

from .adapterhub_format import lora_key, lora_name
from .lora import LoRAConfig, build, fit_sites, fold
from .methods import Method, register


@dataclasses.dataclass
class IA3Config(LoRAConfig):
    """AdapterHub's ``IA3Config`` defaults: vectors on k, v and the intermediate FFN projection."""

    intermediate_lora: bool = True
    r: int = 1
    alpha: float = 1
    attn_matrices: list[str] = dataclasses.field(default_factory=lambda: ["k", "v"])
    composition_mode: str = "scale"
    init_weights: str = "ia3"


IA3 = register(
    Method(
        "ia3",
        IA3Config,
        build,
        insert_lora,
        fold,
        adapterhub_key=lora_key,
        adapterhub_name=lora_name,
        adapterhub_fit=fit_sites,
    )
)
