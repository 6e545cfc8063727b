"""Adapter names: what a name may be, and lists of names (the active adapters) without repeats.

Adapters live in an ``nn.ModuleDict`` and in graph targets (``adapters.<name>.layers...``), so a
name must be a valid, free submodule name there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .errors import ConfigError

RULE = (
    "an adapter name must be a non-empty printable string without '.' that is not an attribute of "
    "torch.nn.ModuleDict (such as 'items', 'keys', 'update', 'training')"
)
_TAKEN = nn.ModuleDict()


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name an adapter, or None if it can."""
    if not isinstance(name, str) or not name or "." in name or not name.isprintable():
        return f"{RULE}; got {name!r}"
    if hasattr(_TAKEN, name):
        return f"{RULE}; {name!r} is one"
    return None


def check_name(name: Any) -> str:
    """``name`` if it can name an adapter; ConfigError with the rule otherwise."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(problem)
    return name


def name_list(names: Any, known: Iterable[str]) -> tuple[str, ...]:
    """None, a name or a list of names as a tuple of known names, each once; ConfigError otherwise.

    An adapter listed twice would run twice (``set_active_adapters(["a", "a"])`` applied ``a``
    twice), so a repeat is refused rather than given a meaning.
    """
    if names is None:
        return ()
    if isinstance(names, str):
        names = (names,)
    elif isinstance(names, (list, tuple)):
        names = tuple(names)
    else:
        raise ConfigError(f"adapter names must be a name, a list of names or None, got {names!r}")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"adapter names must be strings, got {bad}")
    known = list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"no adapter named {unknown}; adapters: {known}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"adapters {repeated} are listed more than once; list each adapter once")
    return names
