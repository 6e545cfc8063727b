"""fxadapt: parameter-efficient adapters for Hugging Face models as graph passes over torch.fx."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import bottleneck as _bottleneck  # noqa: F401  (registers the methods)
from . import compacter as _compacter  # noqa: F401  (registers the methods)
from . import ia3 as _ia3  # noqa: F401  (registers the method)
from . import invertible as _invertible  # noqa: F401  (registers the methods)
from . import lora as _lora  # noqa: F401  (registers the method)
from . import prefix_tuning as _prefix_tuning  # noqa: F401  (registers the methods)
from . import prompt_tuning as _prompt_tuning  # noqa: F401  (registers the method)
from . import reft as _reft  # noqa: F401  (registers the methods)
from . import union as _union  # noqa: F401  (registers the methods)
from .bottleneck import (
    AdapterPlusConfig,
    BnConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    ScaledParBnConfig,
    SeqBnConfig,
)
from .capture import capture, example_inputs
from .compacter import CompacterConfig, CompacterPlusPlusConfig
from .config import AdapterConfig
from .errors import AdapterFileError, CaptureError, ConfigError, FxAdaptError
from .ia3 import IA3Config
from .invertible import DoubleSeqBnInvConfig, SeqBnInvConfig
from .lora import LoRAConfig
from .methods import method_names, method_of, resolve_config
from .model import AdaptedModel
from .prefix_tuning import PrefixTuningConfig, PrefixTuningFlatConfig
from .prompt_tuning import PromptTuningConfig
from .reft import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from .union import ConfigUnion, MAMConfig, UniPELTConfig

__version__ = "0.1.0"


def adapt(
    model: nn.Module,
    config: str | AdapterConfig = "lora",
    name: str | None = None,
    compile: bool = True,
    compile_options: dict[str, Any] | None = None,
    example_inputs: dict[str, Any] | None = None,
    site_roles: dict[str, Any] | None = None,
) -> AdaptedModel:
    """Wrap ``model``, add one adapter, make it the active and only trainable part, compile."""
    adapted = AdaptedModel(
        model,
        compile=compile,
        compile_options=compile_options,
        example_inputs=example_inputs,
        site_roles=site_roles,
    )
    adapter_name = name or (config if isinstance(config, str) else method_of(resolve_config(config)).name)
    adapted.add_adapter(adapter_name, config)
    adapted.train_adapter(adapter_name)
    return adapted


__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterPlusConfig",
    "BnConfig",
    "CaptureError",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigUnion",
    "ConfigError",
    "DiReftConfig",
    "DoubleSeqBnConfig",
    "DoubleSeqBnInvConfig",
    "FxAdaptError",
    "IA3Config",
    "LoRAConfig",
    "LoReftConfig",
    "MAMConfig",
    "NoReftConfig",
    "ParBnConfig",
    "PrefixTuningConfig",
    "PrefixTuningFlatConfig",
    "PromptTuningConfig",
    "ReftConfig",
    "ScaledParBnConfig",
    "SeqBnConfig",
    "SeqBnInvConfig",
    "UniPELTConfig",
    "adapt",
    "capture",
    "example_inputs",
    "method_names",
    "resolve_config",
]
