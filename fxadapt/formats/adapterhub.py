"""AdapterHub ``adapters`` folders: ``adapter_config.json`` + ``pytorch_adapter.bin`` or
``adapter.safetensors``, parameter names mapped onto fxadapt's sites (``read``) and back (``write``).

Each method maps its own tensor names both ways (``Method.adapterhub_key`` and
``Method.adapterhub_name``); this module only loops over them.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError
from ..registry import method_for_adapterhub
from .fileio import CONFIG, atomic_folder, first_existing, read_tensors, write_file

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


def read(path: Path, raw: dict[str, Any], sites: Any) -> tuple[str, Any, dict[str, torch.Tensor]]:
    cfg = dict(raw["config"])
    # AdapterHub writes no architecture for bottleneck adapters; DoRA and VeRA are "lora" with options.
    method = method_for_adapterhub(cfg)
    config = method.config.from_dict(cfg)
    tensors = read_tensors(first_existing(path, ("adapter.safetensors", "pytorch_adapter.bin")))
    if method.adapterhub_prepare is not None:
        tensors = method.adapterhub_prepare(tensors, sites)
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


def write(model: Any, directory: str | Path, name: str, extra: dict[str, bytes] | None = None) -> None:
    """Write adapter ``name`` as AdapterHub's ``save_adapter`` would: config JSON + ``pytorch_adapter.bin``.

    Everything is computed (and any refusal raised) before the folder is touched; the folder is then
    replaced as one unit (``fileio.atomic_folder``), without a stale ``adapter.safetensors``, which
    AdapterHub (with ``use_safetensors=True``) and fxadapt would read before the new weights.
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
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if left_out:
        warnings.warn(
            f"AdapterHub's format does not hold {left_out}: AdapterHub's own save_adapter leaves them out "
            "too (its weight filter wants a module before 'shared_parameters', which a model without a "
            "head lacks), and a load initialises them afresh, so outputs will differ from this model's",
            stacklevel=3,
        )
    with atomic_folder(directory) as tmp:  # drops a stale adapter.safetensors, which loaders read first
        write_file(tmp / WEIGHTS, buffer.getvalue())
        write_file(tmp / CONFIG, text.encode())
        for file, data in (extra or {}).items():  # a head saved with the adapter: one unit with it
            write_file(tmp / file, data)


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
