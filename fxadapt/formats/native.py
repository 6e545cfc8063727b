"""fxadapt's own adapter folder: ``adapter_config.json`` (every option) + ``adapter.safetensors``.

Tensors are named ``<site key>.<param path>``; a union's parts add their prefix (``0.``, ``1.``, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ..registry import method_for_architecture
from ..version import __version__
from .fileio import CONFIG, atomic_folder, read_tensors, write_file
from .keys import match_site, own_key

WEIGHTS = "adapter.safetensors"
FORMAT = "fxadapt"


def write(model: Any, directory: str | os.PathLike, name: str, extra: dict[str, bytes] | None = None) -> None:
    adapter = model.adapters[name]
    state = {k: v.detach().cpu().contiguous() for k, v in adapter.site_state().items()}
    meta = {
        "format": FORMAT,
        "version": __version__,
        "name": name,
        "architecture": adapter.method.name,
        "config": adapter.config.to_dict(),
        "model_class": type(model.base).__name__,
    }
    weights = safetensors_bytes(state, metadata={"format": "pt"})
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_folder(directory) as tmp:
        write_file(tmp / WEIGHTS, weights)
        write_file(tmp / CONFIG, text.encode())
        for file, data in (extra or {}).items():  # a head saved with the adapter: one unit with it
            write_file(tmp / file, data)


def read(path: Path, raw: dict[str, Any], sites: Any) -> tuple[str, Any, dict[str, torch.Tensor]]:
    method = method_for_architecture(raw.get("architecture", ""))
    config = method.config.from_dict(raw.get("config", {}))
    keys = [s.key for s in sites]
    # a union's keys start with its part's prefix ("0.", "1.", ...): map the rest onto this model
    prefixes = sorted((p for p, _ in method.parts(config)), key=len, reverse=True) if method.parts else []
    tensors = {}
    for key, t in read_tensors(path / WEIGHTS).items():
        prefix = next((p for p in prefixes if key.startswith(p)), "")
        tensors[prefix + own_key(key[len(prefix) :], keys)] = t
    if getattr(config, "target_sites", None):
        config = config.replace(target_sites=[match_site(k, keys) for k in config.target_sites])
    return raw.get("name") or path.name, config, tensors
