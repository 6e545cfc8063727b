"""Generation: ``AdaptedModel.generate`` with the KV cache inside captured, compiled prefill and decode graphs.

``capture`` makes the graphs (a static cache as graph inputs), ``graphs`` builds them through the
model's own pipeline (so every method's pass inserts its adapters there), ``config`` resolves
transformers' ``GenerationConfig`` and refuses what cannot be honoured, ``loop`` decodes. See
docs/generation.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..compose.route import route_call
from ..errors import ConfigError
from .config import resolve
from .graphs import Graphs, check_setup
from .loop import decode


def generate(
    model: Any,
    inputs: torch.Tensor | None = None,
    generation_config: Any = None,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    prefix_allowed_tokens_fn: Any = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    adapter_names: Sequence[str | None] | None = None,
    **kwargs: Any,
) -> Any:
    """``model.generate(...)`` for an ``AdaptedModel``: transformers' arguments, greedy or sampling.

    ``generator`` (fxadapt's addition) draws the samples from a seeded ``torch.Generator``; without it,
    sampling uses torch's global generator, as transformers does. ``adapter_names`` (PEFT's mixed
    batch): one adapter name, or None for the base model, per prompt; each row generates with its own.
    """
    base = model.base
    can_generate = getattr(base, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise ConfigError(
            f"{type(base).__name__} cannot generate: generate() needs a model with a language-model head "
            "(a decoder such as LlamaForCausalLM or GPT2LMHeadModel, or an encoder-decoder such as "
            "BartForConditionalGeneration); an encoder-only model or a bare backbone has none"
        )
    seq2seq = bool(base.config.is_encoder_decoder)
    setup = resolve(
        base, inputs, generation_config, logits_processor, stopping_criteria, prefix_allowed_tokens_fn, kwargs
    )
    route = None if adapter_names is None else _route(model, adapter_names, setup)
    check_setup(model, seq2seq, None if route is None else route[0])
    with torch.no_grad():
        return decode(Graphs(model, route), setup, seq2seq, streamer, generator)


def _route(model: Any, adapter_names: Sequence[str | None], setup: Any) -> tuple[Any, torch.Tensor]:
    """The routed setup and each row's adapter index, checked against the prompts (one name per prompt),
    repeated for ``num_return_sequences`` as the prompts are."""
    expand = setup.config.num_return_sequences or 1
    prompts = {"input_ids": setup.inputs[::expand]}  # the rows of the call, before num_return_sequences
    routed, index = route_call(model.adapters, adapter_names, prompts, model.training, model.merged_adapters)
    return routed, index.repeat_interleave(expand)


__all__ = ["generate"]
