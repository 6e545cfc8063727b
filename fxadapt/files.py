"""Adapter folders: fxadapt's own format, and AdapterHub's and PEFT's read through their modules.

A load reads and checks everything (config, every tensor, every shape) on detached modules before
the model is touched, so a missing, corrupt or mismatched file leaves the model as it was.
Weights are read with safetensors or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .adapter import Adapter
from .errors import AdapterFileError, ConfigError
from .methods import method_of

CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"
FORMAT = "fxadapt"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: Any, directory: str | os.PathLike, name: str, format: str = FORMAT) -> None:
    """Write adapter ``name`` into ``directory`` in ``format``: ``"fxadapt"`` or ``"adapterhub"``."""
    writers = _writers()
    if format not in writers:
        raise ConfigError(f"unknown adapter file format {format!r}; valid: {sorted(writers)}")
    writers[format](model, directory, name)


def _writers() -> dict[str, Any]:
    from . import adapterhub_format

    return {FORMAT: _write_own, "adapterhub": adapterhub_format.write}


def _write_own(model: Any, directory: str | os.PathLike, name: str) -> None:
    from . import __version__

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
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS, safetensors_bytes(state, metadata={"format": "pt"}))
    atomic_write(path / CONFIG, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a weights-only torch pickle; a clear error otherwise."""
    if not path.is_file():
        raise AdapterFileError(f"adapter weights file {path} is missing")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFileError(
            f"adapter weights file {path} could not be read (corrupt or truncated?): {exc}"
        ) from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AdapterFileError(f"adapter weights file {path} does not hold a flat dict of tensors")
    return data


def first_existing(path: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (path / n).is_file():
            return path / n
    raise AdapterFileError(f"no adapter weights in {path}: expected one of {list(names)}")


def match_site(module_path: str, site_keys: list[str]) -> str:
    """The site a foreign module path names: exact, else the one key that ends the same way."""
    if module_path in site_keys:
        return module_path
    hits = [k for k in site_keys if k.endswith("." + module_path) or module_path.endswith("." + k)]
    if len(hits) == 1:
        return hits[0]
    why = "several sites match" if hits else "no site matches"
    raise AdapterFileError(f"cannot map module {module_path!r} onto this model: {why}; see model.sites()")


def _read_own(path: Path, raw: dict[str, Any], sites: Any) -> tuple[str, Any, dict[str, torch.Tensor]]:
    from .methods import method_for_architecture

    method = method_for_architecture(raw.get("architecture", ""))
    config = method.config.from_dict(raw.get("config", {}))
    keys = [s.key for s in sites]
    # a union's keys start with its part's prefix ("0.", "1.", ...): map the rest onto this model
    prefixes = sorted((p for p, _ in method.parts(config)), key=len, reverse=True) if method.parts else []
    tensors = {}
    for key, t in read_tensors(path / WEIGHTS).items():
        prefix = next((p for p in prefixes if key.startswith(p)), "")
        tensors[prefix + _own_key(key[len(prefix) :], keys)] = t
    if getattr(config, "target_sites", None):
        config = config.replace(target_sites=[match_site(k, keys) for k in config.target_sites])
    return raw.get("name") or path.name, config, tensors


def _own_key(key: str, site_keys: list[str]) -> str:
    """``<site key>.<param path>`` with the site matched onto this model; the param path may be nested.

    The longest prefix naming a site wins (exactly, else by ``match_site``). A key whose prefix is
    no site (a method's own tensor, such as a bottleneck adapter's ``shared_parameters.*``) is kept
    as it is; the shape check against the built adapter reports it if it does not belong.
    """
    parts = key.split(".")
    known = set(site_keys)
    prefixes = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    for prefix in prefixes:
        if prefix in known:
            return key
    for i, prefix in enumerate(prefixes):
        try:
            return f"{match_site(prefix, site_keys)}.{'.'.join(parts[len(parts) - 1 - i :])}"
        except AdapterFileError:
            continue
    return key


def _reader(raw: dict[str, Any]):
    from . import adapterhub_format, peft_format

    if raw.get("format") == FORMAT:
        return _read_own
    if "peft_type" in raw:
        return peft_format.read
    if isinstance(raw.get("config"), dict) and str(raw.get("version", "")).startswith("adapters."):
        return adapterhub_format.read
    if isinstance(raw.get("config"), dict) and "architecture" in raw["config"]:
        return adapterhub_format.read
    raise AdapterFileError(
        f"{CONFIG} is neither fxadapt's, AdapterHub's nor PEFT's format (no 'format', 'peft_type', "
        "'version: adapters.*' or 'config.architecture' entry)"
    )


def load(
    model: Any, directory: str | os.PathLike, load_as: str | None = None, revision: str | None = None
) -> Adapter:
    """Read a folder (or hub repo) into a new, detached Adapter that fits ``model``; raises before any change."""
    from .hub import resolve

    path = resolve(directory, revision)
    if not (path / CONFIG).is_file():
        raise AdapterFileError(f"{path} has no {CONFIG}: not an adapter folder")
    try:
        raw = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{path / CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path / CONFIG} does not hold a JSON object")
    sites = model.sites()
    try:
        name, config, tensors = _reader(raw)(path, raw, sites)
    except ConfigError as exc:
        raise AdapterFileError(f"{path / CONFIG}: {exc}") from exc
    name = load_as or name
    ref = next((p for p in model.base.parameters() if p.is_floating_point()), None)
    modules = method_of(config).build(config, sites, ref.dtype, ref.device)
    adapter = Adapter(name, config, modules)
    expected = adapter.site_state()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(t.shape)}"
        for k, t in expected.items()
        if k in tensors and tensors[k].shape != t.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if problems:
        raise AdapterFileError(f"adapter in {path} does not fit this model: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k])
    return adapter


def _few(items: list[str], n: int = 4) -> str:
    return str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
