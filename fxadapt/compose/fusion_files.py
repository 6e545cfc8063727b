"""AdapterFusion folders in AdapterHub's format: ``adapter_fusion_config.json`` + ``pytorch_model_adapter_fusion.bin``.

Tensors are named ``<block>.adapter_fusion_layer.<a,b,c>.<query|key|value>.<weight|bias>``, with
``<block>`` the module AdapterHub keeps the residual site's bottleneck layer in
(``encoder.layer.0.output``). A file saved from a model with a head carries the base model's prefix
(``bert.``) or not, depending on the class that saved it; both load.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ..errors import AdapterFileError, ConfigError
from ..formats.fileio import atomic_write, first_existing, read_tensors
from ..methods.bottleneck.naming import block_path
from ..methods.bottleneck.sites import locations
from .fusion import AdapterFusionConfig

CONFIG = "adapter_fusion_config.json"
WEIGHTS = "pytorch_model_adapter_fusion.bin"
SAFE_WEIGHTS = "model_adapter_fusion.safetensors"
VERSION = "adapters.1.3.0"
_KEY = re.compile(
    r"^(?P<path>.+)\.adapter_fusion_layer\.(?P<name>.+?)\.(?P<param>(query|key|value)\.(weight|bias))$"
)


def write(model: Any, directory: str | Path, fusion: Any, prefix: str, use_safetensors: bool = False) -> None:
    """Write ``fusion`` (a ``FusionLayers``) as AdapterHub's ``save_adapter_fusion`` does."""
    sites = model.sites()
    state: dict[str, torch.Tensor] = {}
    for key, layer in fusion.items():
        block = block_path(key, sites)
        for param, tensor in layer.state_dict().items():
            state[f"{prefix}{block}.adapter_fusion_layer.{fusion.name}.{param}"] = (
                tensor.detach().cpu().contiguous()
            )
    hf = model.config
    meta = {
        "adapter_names": list(fusion.adapter_names),
        "config": fusion.config.to_dict(),
        "hidden_size": getattr(hf, "hidden_size", None),
        "model_class": type(model.base).__name__,
        "model_name": getattr(hf, "name_or_path", "") or "",
        "model_type": getattr(hf, "model_type", None),
        "name": fusion.name,
        "version": VERSION,
    }
    if use_safetensors:
        data, name = safetensors_bytes(state, metadata={"format": "pt"}), SAFE_WEIGHTS
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data, name = buffer.getvalue(), WEIGHTS
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / name, data)
    atomic_write(path / CONFIG, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def read(
    model: Any, directory: str | Path
) -> tuple[str, list[str], AdapterFusionConfig, dict[str, dict[str, torch.Tensor]]]:
    """(name, adapter names, config, ``{site key: {param: tensor}}``) of an AdapterHub fusion folder."""
    path = Path(directory)
    if not (path / CONFIG).is_file():
        raise AdapterFileError(f"{path} has no {CONFIG}: not an AdapterFusion folder")
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{path / CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise AdapterFileError(f"{path / CONFIG} has no 'config' object: not an AdapterFusion config")
    names = meta.get("adapter_names")
    if isinstance(names, str):
        names = names.split(",")
    name = meta.get("name") or (",".join(names) if isinstance(names, list) else None)
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) and n for n in names)
        or not isinstance(name, str)
    ):
        raise AdapterFileError(f"{path / CONFIG}: 'adapter_names' must list the fused adapters")
    try:
        config = AdapterFusionConfig.load(meta["config"])
    except ConfigError as exc:
        raise AdapterFileError(f"{path / CONFIG}: {exc}") from exc
    tensors = read_tensors(first_existing(path, (SAFE_WEIGHTS, WEIGHTS)))
    sites = model.sites()
    by_block = {block_path(loc.site.key, sites): loc.site.key for loc in locations(sites)}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None or m["name"] != name:
            raise AdapterFileError(f"fusion tensor {key!r} is not a weight of fusion {name!r}")
        site = _site_for(m["path"], by_block)
        if site is None:
            raise AdapterFileError(
                f"fusion tensor {key!r} names module {m['path']!r}, which has no adapter site"
            )
        layers.setdefault(site, {})[m["param"]] = tensor
    return name, names, config, layers


def _site_for(path: str, by_block: dict[str, str]) -> str | None:
    """The site whose block module ``path`` names, with or without the base model's prefix."""
    if path in by_block:
        return by_block[path]
    hits = [
        site for block, site in by_block.items() if path.endswith("." + block) or block.endswith("." + path)
    ]
    return hits[0] if len(hits) == 1 else None
