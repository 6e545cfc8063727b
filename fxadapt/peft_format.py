"""Read PEFT LoRA folders (``adapter_config.json`` with ``peft_type: LORA`` + ``adapter_model.*``)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterFileError
from .files import first_existing, match_site, read_tensors
from .lora import LoRAConfig

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def read(path: Path, raw: dict[str, Any], sites: Any) -> tuple[str, LoRAConfig, dict[str, torch.Tensor]]:
    if raw.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"PEFT adapter type {raw.get('peft_type')!r} is not supported; supported: LORA"
        )
    refused = {
        "use_dora": bool(raw.get("use_dora")),
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "modules_to_save": bool(raw.get("modules_to_save")),
        "bias": raw.get("bias", "none") != "none",
    }
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise AdapterFileError(f"PEFT LoRA options {bad} are not supported by fxadapt")
    tensors = read_tensors(first_existing(path, ("adapter_model.safetensors", "adapter_model.bin")))
    keys = [s.key for s in sites]
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFileError(f"PEFT tensor {key!r} is not a LoRA A/B weight")
        out[f"{match_site(m['path'], keys)}.lora_{m['ab']}"] = t
    r = int(raw["r"])
    alpha = float(raw["lora_alpha"]) * (math.sqrt(r) if raw.get("use_rslora") else 1.0)
    config = LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=float(raw.get("lora_dropout", 0.0)),
        fused_qkv="joint",
        target_sites=sorted({k.rsplit(".", 1)[0] for k in out}),
    )
    return path.name, config, out
