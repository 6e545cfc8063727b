"""A disk cache of captured programs and compiled artefacts, so a second process starts warm.

A capture is stored as ``torch.export.save`` of the exported program with its weights replaced by
one-element stand-ins (the live model's weights are used on load, matched by name and shape), keyed
by the model's class, config, parameter layout, the call's signature, the training flag and the
versions of torch, transformers, Python and fxadapt. Compiled artefacts (inductor kernels and
AOTAutograd graphs, ``torch.compiler.save_cache_artifacts``) are stored per model and compile mode.
An entry that does not load or does not match the model is removed and rebuilt, never trusted.

``torch.export.load`` and ``torch.compiler.load_cache_artifacts`` unpickle what they read, and
inductor runs the kernels its cache holds, so the folder is trusted as inductor's own cache is: it is
the user's, created readable by the user only (0700 folders, 0600 files); point
``FXADAPT_CACHE_DIR`` at no folder that others can write.

The folder is ``$FXADAPT_CACHE_DIR`` or ``~/.cache/fxadapt`` (``$XDG_CACHE_HOME/fxadapt``);
``FXADAPT_CACHE_DIR=off`` (or ``0``, or empty) turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .version import __version__

ENV = "FXADAPT_CACHE_DIR"
_OFF = ("", "0", "off", "false", "no")
_MAGIC = b"fxadapt-compiled-1\n"
log = logging.getLogger("fxadapt.cache")
# what the cache did in this process: capture_hit, capture_miss, capture_rebuilt, compiled_loaded, ...
stats: Counter[str] = Counter()


def folder() -> Path | None:
    """The cache folder, or None when ``FXADAPT_CACHE_DIR`` turns the cache off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fxadapt"


def _versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "fxadapt": __version__,
    }


def model_key(model: nn.Module) -> dict[str, Any]:
    """What a capture of ``model`` depends on besides the call: class, config, weights' layout, versions."""
    cfg = getattr(model, "config", None)
    config = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)
    layout = [
        (n, tuple(t.shape), str(t.dtype), str(t.device)) for n, t in model.state_dict(keep_vars=True).items()
    ]
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config,
        "attn": str(getattr(cfg, "_attn_implementation", None)),
        "layout": layout,
        "versions": _versions(),
    }


def capture_key(model: nn.Module, call: dict[str, Any]) -> str | None:
    """The disk-cache key of a capture of ``model`` for this call; None when the cache is off or the
    model cannot be described (a config that does not serialise): then nothing is cached."""
    if folder() is None:
        return None
    try:
        return digest({"model": model_key(model), **call})
    except Exception as exc:
        log.warning(
            "fxadapt cache: not caching captures of %s (%s: %s)",
            type(model).__name__,
            type(exc).__name__,
            exc,
        )
        return None


def discard_program(key: str, exc: BaseException) -> None:
    """Drop the entry for ``key`` after it loaded but did not fit the call."""
    root = folder()
    if root is not None:
        stats["capture_rebuilt"] += 1
        _discard(root / "captures" / f"{key}.pt2", f"{type(exc).__name__}: {str(exc)[:200]}")


def digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def _write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder and rename it into place (atomic)."""
    path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _discard(path: Path, why: str) -> None:
    log.warning("fxadapt cache: ignoring %s (%s); it is rebuilt", path, why)
    try:
        path.unlink()
    except OSError:
        pass


def _stand_ins(ep: torch.export.ExportedProgram) -> dict[str, Any]:
    """The program's weights as one-element tensors of the same shape: the model supplies the values."""

    def stub(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        small = torch.zeros((), dtype=t.dtype).expand(t.shape)
        return nn.Parameter(small, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else small

    return {k: stub(v) for k, v in ep.state_dict.items()}


def load_program(key: str, model: nn.Module) -> torch.export.ExportedProgram | None:
    """The cached program for ``key`` if there is a sound one (its weights' names and shapes are the model's)."""
    root = folder()
    if root is None:
        return None
    path = root / "captures" / f"{key}.pt2"
    if not path.exists():
        stats["capture_miss"] += 1
        return None
    try:
        ep = torch.export.load(str(path))
        own = dict(model.state_dict(keep_vars=True))
        for name, value in ep.state_dict.items():
            mine = own.get(name[2:] if name.startswith("m.") else name)
            if mine is None or tuple(mine.shape) != tuple(value.shape) or mine.dtype != value.dtype:
                raise ValueError(f"weight {name} does not match the model")
    except Exception as exc:  # a truncated, tampered or foreign file: rebuild it
        stats["capture_rebuilt"] += 1
        _discard(path, f"{type(exc).__name__}: {str(exc)[:200]}")
        return None
    stats["capture_hit"] += 1
    log.info("fxadapt cache: capture loaded from %s", path)
    return ep


def save_program(key: str, ep: torch.export.ExportedProgram) -> None:
    """Store ``ep`` under ``key`` without its weights (after the caller has taken what it needs from it)."""
    root = folder()
    if root is None:
        return
    ep._state_dict = _stand_ins(ep)
    try:
        with warnings.catch_warnings():  # the one-element stand-ins are views by design
            warnings.filterwarnings("ignore", message="No complete tensor found")
            _write(root / "captures" / f"{key}.pt2", lambda tmp: torch.export.save(ep, tmp))
        stats["capture_saved"] += 1
    except Exception as exc:  # a read-only or full disk must not stop training
        log.warning("fxadapt cache: could not save a capture (%s: %s)", type(exc).__name__, exc)


def _artefacts(key: str) -> Path | None:
    root = folder()
    return None if root is None else root / "compiled" / f"{key}.bin"


def load_compiled(key: str) -> bool:
    """Hand the stored compiled artefacts for ``key`` to torch's caches; False if there were none."""
    path = _artefacts(key)
    if path is None or not path.exists():
        return False
    try:
        data = path.read_bytes()
        head, digest_, payload = (
            data[: len(_MAGIC)],
            data[len(_MAGIC) : len(_MAGIC) + 32],
            data[len(_MAGIC) + 32 :],
        )
        if head != _MAGIC or hashlib.sha256(payload).digest() != digest_:
            raise ValueError("not an fxadapt artefact file, or its checksum does not match")
        torch.compiler.load_cache_artifacts(payload)
    except Exception as exc:
        _discard(path, f"{type(exc).__name__}: {str(exc)[:200]}")
        return False
    stats["compiled_loaded"] += 1
    log.info("fxadapt cache: compiled artefacts loaded from %s", path)
    return True


def save_compiled(key: str) -> None:
    """Store every artefact torch compiled in this process so far (a superset of the previous file)."""
    path = _artefacts(key)
    if path is None:
        return
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        payload = saved[0]
        _write(path, lambda tmp: Path(tmp).write_bytes(_MAGIC + hashlib.sha256(payload).digest() + payload))
        stats["compiled_saved"] += 1
    except Exception as exc:
        log.warning("fxadapt cache: could not save compiled artefacts (%s: %s)", type(exc).__name__, exc)
