"""Read AdapterHub ``adapters`` folders: ``adapter_config.json`` + ``pytorch_adapter.bin`` or
``adapter.safetensors``, parameter names mapped onto fxadapt's sites."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterFileError
from .files import first_existing, match_site, read_tensors
from .methods import method_for_architecture

_LORA_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>[^.]+)$")


def lora_key(key: str, sites: Any, config: Any = None) -> str | None:
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
        mapped = method.adapterhub_key(key, sites, config) if method.adapterhub_key else None
        if mapped is None:
            raise AdapterFileError(f"AdapterHub tensor {key!r} cannot be mapped onto an fxadapt site")
        out[mapped] = t
    _fill_unsaved_shared(method, config, sites, out, path)
    return raw.get("name") or path.name, config, out


def _fill_unsaved_shared(
    method: Any, config: Any, sites: Any, out: dict[str, torch.Tensor], path: Path
) -> None:
    """Initialise shared parameters that AdapterHub did not write, as AdapterHub does when loading.

    AdapterHub 1.3 saves and loads only tensors whose name contains ``.shared_parameters.<name>.``
    (with a leading dot), so the Compacter rules shared by all layers of a bare base model
    (``shared_parameters.<name>.phm_rule``) are neither written nor read: its ``load_adapter``
    leaves them at a fresh initialisation. fxadapt does the same, and says so.
    """
    from passes.bottleneck import SHARED

    if not getattr(config, "phm_layer", False) or any(k.startswith(SHARED + ".") for k in out):
        return
    shared = method.build(config, sites, torch.float32, torch.device("cpu")).get(SHARED)
    if shared is None:
        return
    for k, v in shared.state_dict().items():
        out[f"{SHARED}.{k}"] = v
    warnings.warn(
        f"{path}: the adapter's shared parameters ({', '.join(shared.state_dict())}) are not in the file "
        "(AdapterHub does not save them for a base model without a head); they are freshly initialised, "
        "as AdapterHub's load_adapter would do, so outputs differ from the saving model's",
        stacklevel=3,
    )
