"""The base of every method's config: a dataclass that reads and writes AdapterHub-style dicts.

A config is checked in two steps, at construction and again where it is used (``add_adapter``,
building an adapter, loading one, saving one), since a dataclass can be changed after it is made:
``check_fields`` checks every field against its annotation (an ``int`` is no bool, a ``float`` is a
finite number, a ``list[str]`` is no string), then the method's ``validate`` checks ranges.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import types
import typing
from typing import Any, ClassVar

from .errors import ConfigError


@dataclasses.dataclass
class AdapterConfig:
    """Common behaviour of method configs; subclasses are plain dataclasses with AdapterHub's names."""

    architecture: ClassVar[str] = ""
    # AdapterHub options fxadapt accepts only at their default value: name -> default.
    foreign_defaults: ClassVar[dict[str, Any]] = {}
    # Options AdapterHub's config cannot hold: name -> the value AdapterHub always uses. They are
    # left out of AdapterHub's dict, and an adapter with another value cannot be written there.
    local_options: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Check every field's type (``check_fields``), then its range (``validate``); ConfigError if bad."""
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for a value out of range (types are checked before); subclasses extend it."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["architecture"] = self.architecture
        return out

    def to_adapterhub_dict(self) -> dict[str, Any]:
        """The ``config`` entry of AdapterHub's ``adapter_config.json``: exactly its config class's keys.

        ``to_dict()`` without the options AdapterHub's config cannot hold (``local_options``; one
        not at AdapterHub's value raises ConfigError, since AdapterHub would rebuild another
        adapter), and with the AdapterHub options fxadapt only takes at their default
        (``foreign_defaults``).
        """
        out = self.to_dict()
        for key, default in self.local_options.items():
            value = out.pop(key, default)
            if value != default:
                raise ConfigError(
                    f"{type(self).__name__}: option {key}={value!r} cannot be written in AdapterHub's "
                    f"format: AdapterHub's config cannot hold it, and AdapterHub would rebuild the adapter "
                    f"with {key}={default!r}. Save with format='fxadapt'"
                )
        return {**self.foreign_defaults, **out}

    def replace(self, **changes: Any) -> AdapterConfig:
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a dict (ours or AdapterHub's); unknown options are refused with the valid ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: a config must be a dict of options, got {_short(data)}")
        data = dict(data)
        arch = data.pop("architecture", cls.architecture)
        if arch not in (None, cls.architecture):
            raise ConfigError(f"config is for architecture {arch!r}, not {cls.architecture!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, default in cls.foreign_defaults.items():
            if key in data and key not in fields:
                value = data.pop(key)
                if value != default:
                    raise ConfigError(
                        f"{cls.__name__}: option {key}={value!r} is not supported by fxadapt; "
                        f"only {key}={default!r} is"
                    )
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no option(s) {unknown}; valid options: {sorted(fields)}")
        return cls(**data)


def check(cond: bool, message: str) -> None:
    """Raise ConfigError with ``message`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(message)


def check_fields(config: Any) -> None:
    """Raise ConfigError unless every dataclass field of ``config`` holds a value of its annotated type.

    ``bool`` is True or False; ``int`` an int that is no bool; ``float`` a finite int or float that is
    no bool; ``str`` a string; ``list[X]`` a list or tuple (never a string) of X; ``dict[K, V]`` a
    dict; ``A | B`` either; ``Any`` anything.
    """
    hints = _hints(type(config))
    for field in dataclasses.fields(config):
        expected = hints.get(field.name, Any)
        value = getattr(config, field.name)
        if not _matches(value, expected):
            raise ConfigError(
                f"{type(config).__name__}.{field.name} must be {_describe(expected)}, got {_short(value)}"
            )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = args if args else (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    if origin is typing.Literal:
        return value in args
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if expected is type(None):
        return value is None
    return isinstance(value, expected) if isinstance(expected, type) else True


def _describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_plural(args[0]) if args else 'values'} (not a string)"
    if origin is dict:
        return f"a dict of {_plural(args[1]) if args else 'values'}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {bool: "True or False", int: "an int", float: "a finite number", str: "a string"}
    if expected is type(None):
        return "None"
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _plural(expected: Any) -> str:
    names = {bool: "True/False values", int: "ints", float: "finite numbers", str: "strings"}
    return names.get(expected, _describe(expected))


def _short(value: Any) -> str:
    """``repr`` cut to a line: a value read from a file may be huge or deeply nested."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 60, 60
    return short.repr(value)
