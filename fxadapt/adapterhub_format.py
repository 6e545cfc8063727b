"""AdapterHub ``adapters`` folders: ``adapter_config.json`` + ``pytorch_adapter.bin`` or
``adapter.safetensors``, parameter names mapped onto fxadapt's sites (``read``) and back (``write``).

Each method maps its own tensor names both ways (``Method.adapterhub_key`` and
``Method.adapterhub_name``); this module only loops over them.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError
from .files import CONFIG, atomic_write, first_existing, match_site, read_tensors
from .methods import method_for_architecture

WEIGHTS = "pytorch_adapter.bin"  # what AdapterHub's load_adapter reads by default
SAFE_WEIGHTS = "adapter.safetensors"  # what it reads first with use_safetensors=True
VERSION = "adapters.1.3.0"  # the AdapterHub release whose format this writes (>= 1.1.0: no LoRA alpha fix-up)
# AdapterHub's save_adapter writes, and its load_adapter reads, only the tensors whose name holds one
# of these (AdapterLoader.filter_func in adapters 1.3; "{}" is the adapter's name).
_KEPT = (
    "_adapters.{}.",
    ".adapters.{}.",
    ".prefix_tunings.{}.",
    ".prefix_gates.{}.",
    ".loras.{}.",
    ".refts.{}.",
    ".prompt_tunings.{}.",
    ".shared_parameters.{}.",
)

_LORA_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>.+)$")


def lora_key(key: str, sites: Any, config: Any = None) -> str | None:
    """``<module>.loras.<name>.<param>`` -> ``<site>.<param>``: LoRA and (IA)^3 name tensors by module."""
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    return f"{match_site(m['path'], [s.key for s in sites])}.{m['param']}"


def lora_name(key: str, sites: Any, config: Any, name: str) -> str:
    """``<site>.<param>`` -> ``<site>.loras.<name>.<param>``, the inverse of ``lora_key``."""
    site, param = split_site_key(key, [s.key for s in sites])
    return f"{site}.loras.{name}.{param}"


def split_site_key(key: str, site_keys: Iterable[str]) -> tuple[str, str]:
    """``<site key>.<param path>`` -> (site key, param path), by the longest site key ``key`` starts with."""
    site = max((k for k in site_keys if key.startswith(k + ".")), key=len, default=None)
    if site is None:
        raise ConfigError(f"adapter tensor {key!r} belongs to no site of this model; see model.sites()")
    return site, key[len(site) + 1 :]


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
    if method.adapterhub_fit is not None:
        config = method.adapterhub_fit(config, out, sites)
    return raw.get("name") or path.name, config, out


# ---- writing ---------------------------------------------------------------------------------------


def write(model: Any, directory: str | Path, name: str) -> None:
    """Write adapter ``name`` as AdapterHub's ``save_adapter`` would: config JSON + ``pytorch_adapter.bin``.

    Everything is computed (and any refusal raised) before the folder is touched; each file is then
    written atomically, weights first. A stale ``adapter.safetensors`` in the folder is removed, since
    AdapterHub (with ``use_safetensors=True``) and fxadapt would read it before the new weights.
    """
    adapter = model.adapters[name]
    method = adapter.method
    if method.adapterhub_name is None:
        raise ConfigError(
            f"adapter {name!r} is {method.name!r}, which has no AdapterHub tensor names, so it cannot be "
            "written in AdapterHub's format; save it with format='fxadapt'"
        )
    config = adapter.config.to_adapterhub_dict()
    state, left_out = adapterhub_state(adapter, model.sites(), _base_prefix(model.base), name)
    hf = model.config
    meta = {
        "config": config,
        "hidden_size": getattr(hf, "hidden_size", None),
        "model_class": type(model.base).__name__,
        "model_name": getattr(hf, "name_or_path", "") or "",
        "model_type": getattr(hf, "model_type", None),
        "name": name,
        "version": VERSION,
    }
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if left_out:
        warnings.warn(
            f"AdapterHub's format does not hold {left_out}: AdapterHub's own save_adapter leaves them out "
            "too (its weight filter wants a module before 'shared_parameters', which a model without a "
            "head lacks), and a load initialises them afresh, so outputs will differ from this model's",
            stacklevel=3,
        )
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS, buffer.getvalue())
    (path / SAFE_WEIGHTS).unlink(missing_ok=True)
    atomic_write(path / CONFIG, text.encode())


def adapterhub_state(
    adapter: Any, sites: Any, prefix: str, name: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors under AdapterHub's names, and the names AdapterHub's save filter leaves out.

    A method's ``adapterhub_name`` gives one name or several (a tensor AdapterHub stores under
    several modules, such as the prefix tuning pool). Names of modules AdapterHub keeps on its base
    model (``invertible_adapters.``, ``prompt_tuning.``, ...) come without the base model's
    attribute in a model with a head; ``prefix`` (``"bert."``) is put in front of every name that
    lacks it, as all of AdapterHub's adapter modules live in the base model.
    """
    hook = adapter.method.adapterhub_name
    out: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    for key, tensor in adapter.site_state().items():
        names = hook(key, sites, adapter.config, name)
        for short in [names] if isinstance(names, str) else names:
            full = short if short.startswith(prefix) else prefix + short
            if not any(pattern.format(name) in full for pattern in _KEPT):
                left_out.append(full)
                continue
            if full in out:
                raise ConfigError(
                    f"two tensors of adapter {name!r} map onto AdapterHub's {full!r}: "
                    f"{adapter.method.name}'s adapterhub_name is not one-to-one"
                )
            out[full] = tensor.detach().cpu()
    return out, left_out


def _base_prefix(base: nn.Module) -> str:
    """``"bert."`` for a model with a head (AdapterHub keeps its adapters in the base model), else ``""``."""
    attr = getattr(base, "base_model_prefix", "") or ""
    inner = getattr(base, attr, None) if attr else None
    return f"{attr}." if isinstance(inner, nn.Module) and inner is not base else ""
