"""The head types AdapterHub defines, by name, and what each needs from the base model."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import PredictionHead
from .classification import (
    ClassificationHead,
    ImageClassificationHead,
    MultiLabelClassificationHead,
    MultipleChoiceHead,
)
from .language_modeling import CausalLMHead, MaskedLMHead, Seq2SeqLMHead
from .token import QuestionAnsweringHead, TaggingHead

HEAD_TYPES: dict[str, type[PredictionHead]] = {
    cls.head_type: cls
    for cls in (
        ClassificationHead,
        MultiLabelClassificationHead,
        TaggingHead,
        MultipleChoiceHead,
        QuestionAnsweringHead,
        MaskedLMHead,
        CausalLMHead,
        Seq2SeqLMHead,
        ImageClassificationHead,
    )
}
_TEXT_ONLY = {"tagging", "multiple_choice", "question_answering", "masked_lm", "causal_lm", "seq2seq_lm"}


def head_class(head_type: str) -> type[PredictionHead]:
    if head_type not in HEAD_TYPES:
        raise ConfigError(f"unknown head type {head_type!r}; valid: {sorted(HEAD_TYPES)}")
    return HEAD_TYPES[head_type]


def check_fits(head_type: str, base: nn.Module) -> None:
    """Refuse a head type the base model cannot feed (before anything is built)."""
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "hidden_size", None) is None:
        raise ConfigError(
            f"{type(base).__name__} has no config.hidden_size: flexible heads need a transformers model"
        )
    pixels = getattr(base, "main_input_name", "input_ids") == "pixel_values"
    if head_type in _TEXT_ONLY and pixels:
        raise ConfigError(f"a {head_type} head needs a text model; {type(base).__name__} takes pixel_values")
    if head_type == "image_classification" and not pixels:
        raise ConfigError(
            f"an image_classification head needs a vision model; {type(base).__name__} takes text"
        )
    if head_type == "seq2seq_lm" and not getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(
            f"a seq2seq_lm head needs an encoder-decoder model; {type(base).__name__} is not one"
        )
    if head_type in ("masked_lm", "causal_lm", "seq2seq_lm") and not getattr(cfg, "vocab_size", None):
        raise ConfigError(f"a {head_type} head needs config.vocab_size")


def sequence_pooling(base: nn.Module) -> tuple[str, int | None, int | None]:
    """How AdapterHub's model class for this architecture reads one vector per sequence.

    Encoder-decoder models (BART, mBART, T5...): the last end-of-sequence token of ``input_ids``.
    Decoder-only models (GPT-2, Llama, Mistral, ...: a causal-LM architecture without a masked-LM
    one): the last token that is not padding (``config.pad_token_id``; the last position without it).
    Encoders and vision models: the first token (CLS).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = base.config
    pad, eos = getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if getattr(cfg, "is_encoder_decoder", False):
        return "eos", pad, eos
    kind = getattr(cfg, "model_type", "")
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "last", pad, eos
    return "first", pad, eos


def build_head(name: str, head_type: str, config: dict[str, Any], base: nn.Module) -> PredictionHead:
    """A new head of ``head_type`` for ``base``: AdapterHub's layers, HF's init, the model's dtype/device."""
    check_fits(head_type, base)
    head = head_class(head_type)(name, config, base.config)
    head.pooling, head.pad_token_id, head.eos_token_id = sequence_pooling(base)
    init = getattr(base, "_init_weights", None)
    if init is not None:
        head.apply(init)
    ref = next((p for p in base.parameters() if p.is_floating_point()), None)
    if ref is not None:
        head.to(device=ref.device, dtype=ref.dtype)
    out = head.output_embeddings()
    tie = bool(getattr(base.config, "tie_word_embeddings", False))
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if out is not None and tie and emb is not None and emb.weight.shape == out.weight.shape:
        out.weight = emb.weight
    return head
