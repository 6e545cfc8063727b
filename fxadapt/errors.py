"""Exceptions raised by fxadapt; each message says what was wrong and what to do."""

from __future__ import annotations


class FxAdaptError(Exception):
    """Base class for fxadapt's errors."""


class CaptureError(FxAdaptError, RuntimeError):
    """A model could not be captured into a graph by ``torch.export``."""


class AdapterFileError(FxAdaptError, ValueError):
    """An adapter folder is missing, corrupt, or does not fit the model."""


class ConfigError(FxAdaptError, ValueError):
    """A method name or a config option is unknown or out of range."""
