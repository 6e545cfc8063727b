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

_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>[^.]+)$")


def read(path: Path, raw: dict[str, Any], sites: Any) -> tuple[str, Any, dict[str, torch.Tensor]]:
    cfg = dict(raw["config"])
    method = method_for_architecture(cfg.get("architecture", ""))
    config = method.config.from_dict(cfg)
    tensors = read_tensors(first_existing(path, ("adapter.safetensors", "pytorch_adapter.bin")))
    keys = [s.key for s in sites]
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFileError(f"AdapterHub tensor {key!r} cannot be mapped onto an fxadapt site")
        out[f"{match_site(m['path'], keys)}.{m['param']}"] = t
    return raw.get("name") or path.name, config, out
