"""Static HF head models (``BertForSequenceClassification``, ``LlamaForCausalLM``, ...): their task head.

The task head is what the model class adds around its base model (``model.<base_model_prefix>``):
``classifier``, ``score``, ``qa_outputs``, BERT's MLM transform, ... It is trained with the adapter by
default (``train_adapter(name, train_head=True)``), saved and loaded with it, as AdapterHub does for
static head models and as PEFT's ``modules_to_save`` does. The output embeddings (the LM head) are not
part of it: AdapterHub keeps them frozen (``freeze_embeddings``), and when tied they are the input
embeddings themselves; ``train_embeddings=True`` trains them (and the input embeddings).
"""

from __future__ import annotations

from torch import nn


def inner_model(base: nn.Module) -> nn.Module | None:
    """The base model inside a model with a head (``model.bert``), or None for a model without one."""
    attr = getattr(base, "base_model_prefix", "") or ""
    inner = getattr(base, attr, None) if attr else None
    return inner if isinstance(inner, nn.Module) and inner is not base else None


def embedding_params(base: nn.Module) -> list[nn.Parameter]:
    """The input and output embedding parameters (what ``train_embeddings=True`` trains)."""
    out: list[nn.Parameter] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(base, getter, lambda: None)() if hasattr(base, getter) else None
        if isinstance(module, nn.Module):
            out += list(module.parameters())
    return out


def task_head(base: nn.Module) -> dict[str, nn.Parameter]:
    """The task head's parameters by name (relative to ``base``); empty for a model without a head."""
    inner = inner_model(base)
    if inner is None:
        return {}
    inside = {id(p) for p in inner.parameters()}
    lm = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    lm_params = {id(p) for p in lm.parameters()} if isinstance(lm, nn.Module) else set()
    return {n: p for n, p in base.named_parameters() if id(p) not in inside and id(p) not in lm_params}
