"""Save and load an adapter folder in any supported format: fxadapt's, AdapterHub's or PEFT's.

A load reads the folder's files at once (``fileio.consistent_reads``), then reads and checks
everything (config, every tensor, every shape) on detached modules before the model is touched, so
a missing, corrupt or mismatched file leaves the model as it was. Every problem with a file is an
``AdapterFileError``. A save writes a new folder and swaps it in (``fileio.atomic_folder``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..adapter import SAVED, Adapter
from ..errors import AdapterFileError, ConfigError, FxAdaptError
from ..names import check_name, name_problem
from ..sizing import build_modules
from . import adapterhub, native, peft
from .fileio import CONFIG, consistent_reads, is_file, read_bytes
from .hub import resolve

WRITERS = {native.FORMAT: native.write, "adapterhub": adapterhub.write, "peft": peft.write}
# Said of an error no check of fxadapt's caught: a reader bug (the fuzz test looks for it).
UNEXPECTED = "an unexpected error while reading it"


def save(
    model: Any,
    directory: str | os.PathLike,
    name: str,
    format: str = native.FORMAT,
    extra: dict[str, bytes] | None = None,
) -> None:
    """Write adapter ``name`` into ``directory`` in ``format``: ``"fxadapt"``, ``"adapterhub"`` or ``"peft"``;
    ``extra`` files (a head) go into the same atomic folder swap."""
    if format not in WRITERS:
        raise ConfigError(f"unknown adapter file format {format!r}; valid: {sorted(WRITERS)}")
    model.adapters[name].config.verify()  # a config changed after add_adapter is refused, not written
    WRITERS[format](model, directory, name, extra)


def _reader(raw: dict[str, Any]):
    fmt = raw.get("format")
    if fmt == native.FORMAT:
        return native.read
    if fmt is not None:
        raise AdapterFileError(
            f"unknown adapter file format {fmt!r} (the 'format' entry); fxadapt writes 'fxadapt'"
        )
    if "peft_type" in raw:
        return peft.read
    if "architecture" in raw and "config" in raw:
        raise AdapterFileError(
            "it has fxadapt's 'architecture' and 'config' entries but no '\"format\": \"fxadapt\"' entry "
            "(AdapterHub's files have no top-level 'architecture'): add the entry if fxadapt wrote it"
        )
    if isinstance(raw.get("config"), dict):
        if str(raw.get("version", "")).startswith("adapters.") or "architecture" in raw["config"]:
            return adapterhub.read
    raise AdapterFileError(
        "it is neither fxadapt's, AdapterHub's nor PEFT's format (no '\"format\": \"fxadapt\"', "
        "'peft_type', 'version: adapters.*' or 'config.architecture' entry)"
    )


def load(
    model: Any, directory: str | os.PathLike, load_as: str | None = None, revision: str | None = None
) -> Adapter:
    """Read a folder (or hub repo) into a new, detached Adapter that fits ``model``; raises before any change."""
    if load_as is not None:
        check_name(load_as)
    path = resolve(directory, revision)
    sites = model.sites()
    with consistent_reads(path):
        if not is_file(path / CONFIG):
            raise AdapterFileError(f"{path} has no {CONFIG}: not an adapter folder")
        try:
            return _load(model, path, sites, load_as)
        except AdapterFileError:
            raise
        except ConfigError as exc:
            raise AdapterFileError(f"{path / CONFIG}: {exc}") from exc
        except FxAdaptError as exc:
            raise AdapterFileError(f"adapter in {path} cannot be loaded: {exc}") from exc
        except Exception as exc:
            raise AdapterFileError(
                f"adapter in {path} cannot be loaded: {UNEXPECTED} ({type(exc).__name__}: "
                f"{str(exc)[:300]}); the file is malformed, or this is a bug in fxadapt's reader"
            ) from exc


def _load(model: Any, path: Path, sites: Any, load_as: str | None) -> Adapter:
    raw = _read_json(path / CONFIG)
    try:
        reader = _reader(raw)
    except AdapterFileError as exc:
        raise AdapterFileError(f"{path / CONFIG}: {exc}") from None
    name, config, tensors = reader(path, raw, sites)
    if load_as is None:
        problem = name_problem(name)
        if problem:
            raise AdapterFileError(
                f"{path / CONFIG} names the adapter {name!r}, but {problem}; pass load_as="
            )
    modules = build_modules(config, sites, model.base)
    adapter = Adapter(load_as or name, config, modules, _saved_in(model.base, tensors, path))
    expected = adapter.site_state()
    _check_tensors(path, tensors, expected)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k])
    return adapter


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(read_bytes(path))
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise AdapterFileError(f"{path} is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path} does not hold a JSON object")
    return raw


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(t.shape)}"
        for k, t in expected.items()
        if k in tensors and tensors[k].shape != t.shape
    ]
    kinds = [
        f"{k}: {tensors[k].dtype}"
        for k, t in expected.items()
        if k in tensors and tensors[k].is_floating_point() != t.is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if kinds:
        problems.append(f"wrong dtypes (floating point expected) {_few(kinds)}")
    if problems:
        raise AdapterFileError(f"adapter in {path} does not fit this model: " + "; ".join(problems))
    bad = [k for k in expected if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all()]
    if bad:
        raise AdapterFileError(f"adapter in {path} has non-finite values (inf or NaN) in {_few(bad)}")


def _saved_in(base: Any, tensors: dict[str, torch.Tensor], path: Any) -> dict[str, torch.Tensor]:
    """The base parameters a file carries its own copy of (``modules_to_save.<parameter path>``)."""
    out = {}
    for key in tensors:
        if key.startswith(SAVED + "."):
            name = key[len(SAVED) + 1 :]
            try:
                out[name] = base.get_parameter(name)
            except AttributeError:
                raise AdapterFileError(
                    f"adapter in {path} carries its own {name!r} (modules_to_save), which this model does not have"
                ) from None
    return out


def _few(items: list[str], n: int = 4) -> str:
    return str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
