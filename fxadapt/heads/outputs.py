"""The output a head returns: transformers' own ``ModelOutput`` class, and the tree spec the graph's leaves rebuild.

The class is the one AdapterHub's head returns (and the matching HF ``*For*`` model returns):
``SequenceClassifierOutput``, ``TokenClassifierOutput``, ``QuestionAnsweringModelOutput``, ... with the
``Seq2Seq*`` variant on an encoder-decoder base. Fields of the base model's output that the class
also has (``hidden_states``, ``attentions``, ``encoder_last_hidden_state``, ...) pass through.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten
from transformers import modeling_outputs as mo
from transformers.utils import ModelOutput

_CLASSES = {
    "classification": (mo.SequenceClassifierOutput, mo.Seq2SeqSequenceClassifierOutput),
    "multilabel_classification": (mo.SequenceClassifierOutput, mo.Seq2SeqSequenceClassifierOutput),
    "multiple_choice": (mo.MultipleChoiceModelOutput, mo.MultipleChoiceModelOutput),
    "tagging": (mo.TokenClassifierOutput, mo.TokenClassifierOutput),
    "question_answering": (mo.QuestionAnsweringModelOutput, mo.Seq2SeqQuestionAnsweringModelOutput),
    "image_classification": (mo.ImageClassifierOutput, mo.ImageClassifierOutput),
    "masked_lm": (mo.MaskedLMOutput, mo.MaskedLMOutput),
    "causal_lm": (mo.CausalLMOutputWithPast, mo.CausalLMOutputWithPast),
    "seq2seq_lm": (mo.Seq2SeqLMOutput, mo.Seq2SeqLMOutput),
}


def output_class(head_type: str, seq2seq: bool) -> type[ModelOutput]:
    return _CLASSES[head_type][1 if seq2seq else 0]


def fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def base_fields(spec: TreeSpec, leaves: list[Any]) -> dict[str, tuple[TreeSpec, list[Any]]]:
    """Each field of the base model's output: (its sub-spec, its leaves), from the flat output list."""
    if not (isinstance(spec.type, type) and issubclass(spec.type, ModelOutput)):
        return {}
    out, start = {}, 0
    for name, child in zip(spec.context, spec.children()):
        out[name] = (child, leaves[start : start + child.num_leaves])
        start += child.num_leaves
    return out


class Leaves:
    """Stand-in tensors for graph leaves, so an output structure can be built and flattened into a spec."""

    def __init__(self) -> None:
        self._tokens: dict[int, tuple[torch.Tensor, Any]] = {}

    def stand_in(self, leaf: Any) -> torch.Tensor:
        t = torch.empty(0)
        self._tokens[id(t)] = (t, leaf)  # keeps t alive, so ids stay unique
        return t

    def flatten(self, structure: Any) -> tuple[list[Any], TreeSpec]:
        flat, spec = tree_flatten(structure)
        return [self._tokens[id(t)][1] for t in flat], spec


def structure(
    cls: type[ModelOutput],
    values: dict[str, Any],
    passthrough: dict[str, tuple[TreeSpec, list[Any]]],
    leaves: Leaves,
) -> ModelOutput:
    """``cls`` holding stand-ins for the head's ``values`` and the base fields in ``passthrough``."""
    kwargs = {}
    for name in fields(cls):
        if name in values:
            kwargs[name] = leaves.stand_in(values[name])
        elif name in passthrough:
            spec, items = passthrough[name]
            kwargs[name] = tree_unflatten([leaves.stand_in(x) for x in items], spec)
    return cls(**kwargs)


@dataclasses.dataclass
class MultiHeadOutput(ModelOutput):
    """AdapterHub's output for several heads: ``outputs[i]`` is head i's output; ``loss`` their sum.

    Indexing with an int and iterating go over the heads; ``logits`` stacks the heads' logits along
    the batch (it fails, as in AdapterHub, when the heads have different numbers of labels).
    """

    head_outputs: list[ModelOutput] | None = None
    loss: torch.FloatTensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        return torch.vstack([out["logits"] for out in self.head_outputs])

    def __getitem__(self, k: Any) -> Any:
        return self.head_outputs[k] if isinstance(k, int) else super().__getitem__(k)

    def __iter__(self):
        return iter(self.head_outputs)

    def __len__(self) -> int:
        return len(self.head_outputs)
