"""The base of every method's config: a dataclass that reads and writes AdapterHub-style dicts."""

from __future__ import annotations

import dataclasses
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
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for a value out of range; subclasses extend it."""

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
