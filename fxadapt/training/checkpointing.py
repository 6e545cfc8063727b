"""Activation (gradient) checkpointing for an AdaptedModel: which layers the training graph recomputes.

``activation_checkpointing_enable()`` (transformers 5's name; ``gradient_checkpointing_enable()`` is
AdapterHub's and the older HF one) makes every training graph recompute each layer in the backward
instead of keeping its activations (``passes/checkpoint.py``), in eager graphs and under
torch.compile alike. ``every_n_layers`` and ``offload`` mean what they mean in transformers. With
``compile=True``, ``{"memory_budget": b}`` instead lets torch.compile choose what to recompute so that
at most a share ``b`` of the activations is kept (``torch._functorch.config.activation_memory_budget``).

HF's own checkpointing, enabled on the model before (or after) wrapping, is honoured: the layers HF
would checkpoint (with its ``every_n_layers`` and offloading) are the ones the graph recomputes, and
the capture runs with HF's flags paused so that the graph holds plain layers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from passes.checkpoint import checkpoint_layers

from ..errors import ConfigError


class GradientCheckpointingMixin:
    """``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` and their graph hooks."""

    def _init_checkpointing(self) -> None:
        self._checkpointing: dict[str, Any] | None = None

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute layers in the backward instead of keeping their activations (training graphs only).

        ``activation_checkpointing_kwargs``: ``use_reentrant`` is accepted (fxadapt always uses the
        non-reentrant form, which recomputes the same values and needs no input that requires grad);
        ``memory_budget`` (0 < b <= 1, ``compile=True`` only) hands the choice to torch.compile.
        """
        kwargs = dict(activation_checkpointing_kwargs or {})
        kwargs.pop("use_reentrant", None)
        budget = kwargs.pop("memory_budget", None)
        if kwargs:
            raise ConfigError(
                f"activation checkpointing options {sorted(kwargs)} are not supported; "
                "valid: use_reentrant, memory_budget"
            )
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ConfigError(f"every_n_layers must be an int >= 1, got {every_n_layers!r}")
        if budget is not None:
            if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
                raise ConfigError(f"memory_budget must be in (0, 1], got {budget!r}")
            if not self.compiled:
                raise ConfigError(
                    "memory_budget lets torch.compile choose what to recompute, so it needs "
                    "AdaptedModel(..., compile=True); without compiling, leave it out to recompute each layer"
                )
        self._checkpointing = {
            "every_n_layers": every_n_layers,
            "offload": bool(offload),
            "memory_budget": budget,
        }
        self._runners.clear()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """AdapterHub's (and transformers 4's) name for ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Keep activations again; also turns off HF's own checkpointing flags on the base model."""
        self._checkpointing = None
        if any(_hf_flags(self.base).values()):
            self.base.activation_checkpointing_disable()
        self._runners.clear()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpoint_config() is not None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # ---- hooks of the graph pipeline -----------------------------------------------------------
    def _checkpoint_config(self) -> dict[str, Any] | None:
        if self._checkpointing is not None:
            return self._checkpointing
        flags = _hf_flags(self.base)
        if not flags:
            return None
        enabled = {path for path, on in flags.items() if on}
        if not enabled:
            return None
        funcs = [getattr(m, "_gradient_checkpointing_func", None) for m in self.base.modules()]
        func = next((f for f in funcs if f is not None), None)
        inner = func.func if isinstance(func, functools.partial) else func
        offload = inner is not None and inner is not _torch_checkpoint
        return {"layers": enabled, "offload": offload, "memory_budget": None, "every_n_layers": 1}

    def _checkpoint_graph(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Called on each training graph: move each checkpointed layer into a recomputed sub-graph."""
        config = self._checkpoint_config()
        if config is None or config["memory_budget"] is not None:
            return gm
        layers = config.get("layers")
        n = config["every_n_layers"]
        order: dict[str, int] = {}

        def keep(path: str) -> bool:
            if layers is not None:
                return any(path == f"m.{p}" or path.endswith("." + p) for p in layers)
            order.setdefault(path, len(order))
            return order[path] % n == 0

        checkpoint_layers(gm, keep, offload=config["offload"])
        return gm

    def _wrap_runner(self, fn: Any) -> Any:
        config = self._checkpoint_config()
        if config is None or config["memory_budget"] is None:
            return fn
        budget = float(config["memory_budget"])

        def run(*args: Any) -> Any:
            if not torch.is_grad_enabled():
                return fn(*args)
            with torch._functorch.config.patch(activation_memory_budget=budget):
                return fn(*args)

        return run

    @contextlib.contextmanager
    def _hf_checkpointing_paused(self) -> Iterator[None]:
        """Capture plain layers: HF's checkpointing flags are off during ``torch.export``."""
        flags = {
            m: m.gradient_checkpointing for m in self.base.modules() if hasattr(m, "gradient_checkpointing")
        }
        try:
            for m in flags:
                m.gradient_checkpointing = False
            yield
        finally:
            for m, on in flags.items():
                m.gradient_checkpointing = on


def _hf_flags(base: Any) -> dict[str, bool]:
    """HF's per-layer checkpointing flags on ``base`` (module path -> on), for layers that have one."""
    return {
        name: bool(m.gradient_checkpointing)
        for name, m in base.named_modules()
        if name and hasattr(m, "gradient_checkpointing") and isinstance(m.gradient_checkpointing, bool)
    }
