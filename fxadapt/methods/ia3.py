"""(IA)^3: learned rescaling of keys, values and the FFN's intermediate activations (Liu et al., 2022).

As in AdapterHub, it is LoRA in ``composition_mode="scale"``: the same pass inserts the module after
each projection, the module multiplies the output by a learned vector, merging scales the weight's
rows (and the bias).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from passes.lora import insert_lora

from ..errors import AdapterFileError
from ..formats.keys import site_for
from ..formats.peft import refuse_options
from ..registry import Method, register
from .lora import LoRAConfig, build, fit_sites, fold
from .lora.method import COMPOSE
from .lora.naming import lora_key, lora_name
from .lora.peft import _IA3_KEY, scale_to_peft


@dataclasses.dataclass
class IA3Config(LoRAConfig):
    """AdapterHub's ``IA3Config`` defaults: vectors on k, v and the intermediate FFN projection."""

    intermediate_lora: bool = True
    r: int = 1
    alpha: float = 1
    attn_matrices: list[str] = dataclasses.field(default_factory=lambda: ["k", "v"])
    composition_mode: str = "scale"
    init_weights: str = "ia3"


# ---- PEFT ----------------------------------------------------------------------------------------------


def ia3_from_peft(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[Any, dict]:
    """PEFT (IA)^3 scales each module's output (``[out, 1]``): fxadapt's (IA)^3 at those sites.

    PEFT's ``feedforward_modules`` scale a module's input instead, which fxadapt's (IA)^3 (AdapterHub's,
    a scale on outputs) does not compute: such a file is refused, naming the option.
    """
    refuse_options(raw, {"feedforward_modules", "fan_in_fan_out"}, "(IA)^3")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _IA3_KEY.match(key)
        if m is None:
            raise AdapterFileError(f"PEFT tensor {key!r} is not an (IA)^3 vector")
        if t.dim() != 2 or t.shape[1] != 1:
            raise AdapterFileError(
                f"PEFT (IA)^3 option feedforward_modules: {m['path']!r} scales its input ({tuple(t.shape)}), "
                "which fxadapt's (IA)^3 (a scale on a projection's output, as in AdapterHub) cannot express"
            )
        out[f"{site_for(m['path'], sites)}.lora_B"] = t
    config = IA3Config(r=1, alpha=1, fused_qkv="joint", target_sites=sorted(k.rsplit(".", 1)[0] for k in out))
    return config, out


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
        compose=COMPOSE,
        peft_type="IA3",
        from_peft=ia3_from_peft,
        to_peft=scale_to_peft,
    )
)
