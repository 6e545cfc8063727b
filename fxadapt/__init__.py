"""fxadapt: parameter-efficient adapters for Hugging Face models as graph passes over torch.fx."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import methods as _methods  # noqa: F401  (registers every method)
from .capture import capture, example_inputs
from .compose.blocks import AdapterCompositionBlock, Average, BatchSplit, Fuse, Parallel, Split, Stack, Sum
from .compose.fusion import AdapterFusionConfig
from .config import AdapterConfig
from .errors import AdapterFileError, CaptureError, ConfigError, FxAdaptError
from .heads.base import PredictionHead
from .heads.outputs import MultiHeadOutput
from .interface import AdapterModelInterface
from .methods.bottleneck import (
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    DoubleSeqBnInvConfig,
    ParBnConfig,
    ScaledParBnConfig,
    SeqBnConfig,
    SeqBnInvConfig,
)
from .methods.ia3 import IA3Config
from .methods.lora import LoRAConfig
from .methods.prefix_tuning import PrefixTuningConfig, PrefixTuningFlatConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.reft import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from .methods.union import ConfigUnion, MAMConfig, UniPELTConfig
from .model import AdaptedModel
from .registry import method_names, method_of, resolve_config
from .version import __version__  # noqa: F401  (fxadapt.__version__)


def adapt(
    model: nn.Module,
    config: str | AdapterConfig = "lora",
    name: str | None = None,
    compile: bool | str = True,
    compile_options: dict[str, Any] | None = None,
    example_inputs: dict[str, Any] | None = None,
    site_roles: dict[str, Any] | None = None,
    interface: AdapterModelInterface | None = None,
) -> AdaptedModel:
    """Wrap ``model``, add one adapter, make it the active and only trainable part, compile."""
    adapted = AdaptedModel(
        model,
        compile=compile,
        compile_options=compile_options,
        example_inputs=example_inputs,
        site_roles=site_roles,
        interface=interface,
    )
    adapter_name = name or (config if isinstance(config, str) else method_of(resolve_config(config)).name)
    adapted.add_adapter(adapter_name, config)
    adapted.train_adapter(adapter_name)
    return adapted


def __getattr__(name: str) -> Any:
    # the Trainer callback imports transformers' Trainer machinery, which takes seconds: only on use
    if name == "AdapterDropCallback":
        from .compose.drop_callback import AdapterDropCallback

        return AdapterDropCallback
    raise AttributeError(f"module 'fxadapt' has no attribute {name!r}")


__all__ = [
    "AdapterCompositionBlock",
    "AdapterDropCallback",
    "AdapterFusionConfig",
    "Average",
    "BatchSplit",
    "Fuse",
    "Parallel",
    "Split",
    "Stack",
    "Sum",
    "AdaptedModel",
    "AdapterModelInterface",
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
    "MultiHeadOutput",
    "NoReftConfig",
    "ParBnConfig",
    "PredictionHead",
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
