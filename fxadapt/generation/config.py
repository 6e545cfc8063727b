"""Generation options: a ``GenerationConfig`` resolved as transformers' ``generate`` resolves it, checked.

The base model's own ``GenerationMixin`` helpers do the work, so defaults (the model's
``generation_config``), keyword overrides, special tokens, ``max_new_tokens`` -> ``max_length``, the
logits processors (temperature, top-k, top-p, repetition penalty, ``min_new_tokens``, ...) and the
stopping criteria (``max_length``, ``eos_token_id`` lists, ``stop_strings``, ``max_time``) are exactly
``generate``'s. Decoding is greedy or sampling; every other decoding mode and every option whose
result fxadapt's graphs cannot produce is refused by name, before anything runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode

from ..errors import ConfigError

# generate() arguments that are not GenerationConfig fields: refused (they need graphs fxadapt does not build)
_REFUSED_ARGUMENTS = {
    "assistant_model": "assisted generation",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "synced_gpus": "multi-GPU synchronisation",
    "custom_generate": "custom decoding loops",
    "inputs_embeds": "generation from embeddings (pass input_ids)",
    "decoder_inputs_embeds": "generation from embeddings (pass decoder_input_ids)",
    "cache": "a cache passed in (fxadapt allocates its own static cache)",
    "past_key_values": "a cache passed in (fxadapt allocates its own static cache)",
    "encoder_outputs": "precomputed encoder outputs (fxadapt runs the encoder with the adapters)",
    "decoder_attention_mask": "a decoder attention mask",
    "token_type_ids": "token type ids",
    "position_ids": "position ids (generate derives them from attention_mask)",
}
_MODES = {
    GenerationMode.BEAM_SEARCH: "num_beams",
    GenerationMode.BEAM_SAMPLE: "num_beams",
    GenerationMode.GROUP_BEAM_SEARCH: "num_beam_groups",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "constraints / force_words_ids",
    GenerationMode.CONTRASTIVE_SEARCH: "penalty_alpha",
    GenerationMode.ASSISTED_GENERATION: "prompt_lookup_num_tokens / assistant_early_exit / use_mtp",
    GenerationMode.DOLA_GENERATION: "dola_layers",
}
_CACHES = (None, "static", "dynamic")
MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")


@dataclass
class Setup:
    """Everything the decoding loop needs, resolved from the call."""

    config: GenerationConfig
    inputs: torch.Tensor  # the prompt (encoder input for an encoder-decoder)
    attention_mask: torch.Tensor
    input_ids: torch.Tensor  # the sequences to extend (the decoder's for an encoder-decoder)
    processors: LogitsProcessorList
    stopping: StoppingCriteriaList
    max_cache_len: int | None


def _refuse(option: str, what: str) -> ConfigError:
    return ConfigError(f"generate(): {option} is not supported by fxadapt ({what}); remove it")


def resolve(
    base: Any,
    inputs: torch.Tensor | None,
    generation_config: GenerationConfig | None,
    logits_processor: LogitsProcessorList | None,
    stopping_criteria: StoppingCriteriaList | None,
    prefix_allowed_tokens_fn: Any,
    kwargs: dict[str, Any],
) -> Setup:
    """Resolve the call as ``generate`` would, refusing what fxadapt cannot honour."""
    for name, what in _REFUSED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise _refuse(name, what)
    tokenizer = kwargs.pop("tokenizer", None)
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and base.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and base.generation_config.min_length is None
    )
    try:
        config, model_kwargs = base._prepare_generation_config(generation_config, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"generate(): {exc}") from exc
    _check_config(config)
    unknown = [k for k in model_kwargs if k not in MODEL_INPUTS and model_kwargs[k] is not None]
    if unknown:
        raise ConfigError(
            f"generate(): {unknown} are neither GenerationConfig options nor inputs fxadapt's graphs take "
            f"({list(MODEL_INPUTS)}); check the spelling"
        )
    if inputs is None:
        inputs = model_kwargs.pop("input_ids", None)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.is_floating_point():
        raise ConfigError("generate() needs input_ids: a [batch, length] tensor of token ids")
    if inputs.shape[1] == 0:
        raise ConfigError("generate() needs at least one prompt token per row (input_ids has length 0)")
    seq2seq = bool(base.config.is_encoder_decoder)
    mask = model_kwargs.get("attention_mask")
    base._prepare_special_tokens(config, mask is not None, device=inputs.device, batch_size=inputs.shape[0])
    if mask is None:
        mask = base._prepare_attention_mask_for_generation(inputs, config, {})
    if mask.shape != inputs.shape:
        raise ConfigError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(inputs.shape)}")
    mask = mask.to(torch.long)
    if not seq2seq and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ConfigError(
            "generate(): attention_mask has padding after real tokens; a decoder-only model generates from "
            "the end of each row, so pad on the left (tokenizer padding_side='left')"
        )
    if seq2seq:
        input_ids, _ = base._prepare_decoder_input_ids_for_generation(
            batch_size=inputs.shape[0],
            model_input_name="input_ids",
            model_kwargs={k: v for k, v in model_kwargs.items() if k == "decoder_input_ids"},
            decoder_start_token_id=config._decoder_start_token_tensor,
            device=inputs.device,
        )
    else:
        input_ids = inputs
    expand = config.num_return_sequences or 1
    if expand > 1:
        inputs, mask = inputs.repeat_interleave(expand, 0), mask.repeat_interleave(expand, 0)
        input_ids = input_ids.repeat_interleave(expand, 0)
    config = base._prepare_generated_length(
        generation_config=config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        inputs_tensor=inputs,
        input_ids_length=input_ids.shape[1],
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using the model-agnostic default")
            base._validate_generated_length(config, input_ids.shape[1], has_default_max_length)
    except ValueError as exc:
        raise ConfigError(f"generate(): {exc}") from exc
    max_cache_len = _max_cache_len(config, input_ids.shape[1], config.max_length - 1)
    processors = base._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=input_ids.shape[1],
        encoder_input_ids=inputs,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        logits_processor=logits_processor or LogitsProcessorList(),
        device=inputs.device,
        model_kwargs={"attention_mask": mask},
    )
    stopping = base._get_stopping_criteria(
        generation_config=config,
        stopping_criteria=stopping_criteria or StoppingCriteriaList(),
        tokenizer=tokenizer,
    )
    return Setup(config, inputs, mask, input_ids, processors, stopping, max_cache_len)


def _check_config(config: GenerationConfig) -> None:
    mode = config.get_generation_mode()
    if mode in _MODES:
        raise _refuse(_MODES[mode], f"{mode.value}; fxadapt generates by greedy decoding or sampling")
    if config.output_attentions:
        raise _refuse("output_attentions", "the generation graphs return logits only")
    if config.output_hidden_states:
        raise _refuse("output_hidden_states", "the generation graphs return logits only")
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise _refuse("guidance_scale", "classifier-free guidance runs the model on a second prompt")
    if config.cache_implementation not in _CACHES:
        raise _refuse(
            f"cache_implementation={config.cache_implementation!r}",
            "fxadapt keeps a static cache inside its graphs",
        )
    if config.use_cache is False:
        warnings.warn(
            "generate(use_cache=False): fxadapt always decodes with its static cache; the tokens are the same",
            stacklevel=3,
        )
    if config.compile_config is not None:
        warnings.warn(
            "generate(compile_config=...) is not used: fxadapt compiles when the model was made with compile=True",
            stacklevel=3,
        )


def _max_cache_len(config: GenerationConfig, prompt: int, needed: int) -> int | None:
    """``cache_config={"max_cache_len": n}``: the cache holds at most ``n`` positions (transformers' static
    cache option); ``needed``: what the prompt and the new tokens take (the last token is not cached)."""
    limit = (
        (config.cache_config or {}).get("max_cache_len") if isinstance(config.cache_config, dict) else None
    )
    if limit is None:
        return None
    if prompt > limit:
        raise ConfigError(
            f"generate(): the prompt has {prompt} tokens but the cache holds {limit} "
            "(cache_config max_cache_len); shorten the prompt or raise max_cache_len"
        )
    if needed > limit:
        raise ConfigError(
            f"generate(): the prompt and the new tokens need a cache of {needed} positions but "
            f"cache_config max_cache_len is {limit}; lower max_new_tokens or raise max_cache_len"
        )
    return int(limit)
