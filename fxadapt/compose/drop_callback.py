"""``AdapterDropCallback``: AdapterHub's AdapterDrop training recipe as a Hugging Face ``Trainer`` callback.

Kept apart from ``drop.py`` (and imported lazily by ``fxadapt``) because importing the ``Trainer``'s
callback module takes seconds.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from passes.compose import layer_numbers

from ..errors import ConfigError


class AdapterDropCallback(TrainerCallback):
    """Skip the adapters of the lowest ``k`` layers in each training step, ``k`` drawn from ``0..max_skip``.

    AdapterHub's ``AdapterDropTrainerCallback`` (its AdapterDrop notebook) sets
    ``skip_layers=list(range(randint(0, 11)))`` at every step of a 12-layer model, i.e. up to 10
    layers: pass ``max_skip=10`` for the same. The default is every layer but the last. Between steps
    (evaluation, checkpoints) nothing is skipped. ``adapter_setup`` defaults to the model's active
    setup; ``seed`` gives the callback its own generator (default: torch's global one, which the
    ``Trainer`` seeds). Skipping is a graph input in training, so the steps share one graph.
    """

    def __init__(
        self, adapter_setup: Any = None, max_skip: int | None = None, seed: int | None = None
    ) -> None:
        if max_skip is not None and (
            not isinstance(max_skip, int) or isinstance(max_skip, bool) or max_skip < 0
        ):
            raise ConfigError(f"AdapterDropCallback.max_skip must be an int >= 0, got {max_skip!r}")
        self.adapter_setup = adapter_setup
        self.max_skip = max_skip
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def _setup(self, model: Any) -> tuple[Any, int]:
        if not hasattr(model, "set_active_adapters") or not hasattr(model, "sites"):
            raise ConfigError(
                f"AdapterDropCallback needs the Trainer's model to be an fxadapt.AdaptedModel, got "
                f"{type(model).__name__}"
            )
        layers = max(layer_numbers(model.sites()).values(), default=-1) + 1
        max_skip = layers - 1 if self.max_skip is None else self.max_skip
        if max_skip > layers:
            raise ConfigError(f"AdapterDropCallback.max_skip={max_skip}, but the model has {layers} layers")
        setup = self.adapter_setup if self.adapter_setup is not None else model.active_adapters
        if setup is None:
            raise ConfigError("AdapterDropCallback: no adapter setup is active; call train_adapter() first")
        return setup, max_skip

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        setup, max_skip = self._setup(model)
        k = int(torch.randint(0, max_skip + 1, (), generator=self.generator))
        model.set_active_adapters(setup, skip_layers=list(range(k)))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        setup, _ = self._setup(model)
        model.set_active_adapters(setup)
