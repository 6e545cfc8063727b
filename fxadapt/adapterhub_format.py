"""Read AdapterHub ``adapters`` folders: ``adapter_config.json`` + ``pytorch_adapter.bin`` or
``adapter.safetensors``, parameter names mapped onto fxadapt's sites."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterFileError
from .files import first_existing, match_site, read_tensors
from .methods import method_for_architecture

_LORA_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>[^.]+)$")


def lora_key(key: str, sites: Any) -> str | None:
    """``<module>.loras.<name>.<param>`` -> ``<site>.<param>``: LoRA and (IA)^3 name tensors by module."""
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    return f"{match_site(m['path'], [s.key for s in sites])}.{m['param']}"


def read(path: Path, raw: dict[str, Any], sites: Any) -> tuple[str, Any, dict[str, torch.Tensor]]:
    cfg = dict(raw["config"])
    # AdapterHub writes no architecture for bottleneck adapters.
    method = method_for_architecture(cfg.get("architecture") or "bottleneck")
    config = method.config.from_dict(cfg)
    tensors = read_tensors(first_existing(path, ("adapter.safetensors", "pytorch_adapter.bin")))
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        mapped = method.adapterhub_key(key, sites) if method.adapterhub_key else None
        if mapped is None:
            raise AdapterFileError(f"AdapterHub tensor {key!r} cannot be mapped onto an fxadapt site")
        out[mapped] = t
    return raw.get("name") or path.name, config, out
