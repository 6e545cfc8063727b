"""The base of every flexible prediction head: AdapterHub's layer stack, its module indices and config.

A head is an ``nn.Sequential`` whose children are numbered as in AdapterHub (``0`` dropout, ``1``
linear, ``2`` activation, ...), so its state dict keys are AdapterHub's ``heads.<name>.<index>.*``
without the prefix. Its ``forward`` takes the base model's outputs as keyword tensors and returns a
dict of tensors (``logits``, ``loss``, ...): it runs as one ``call_module`` node at the end of the
rewritten graph (``passes/heads.py``), tensor code only, so torch.compile traces it whole.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check
from ..errors import ConfigError
from ..methods.activations import Activation, activation_names

IGNORE_INDEX = -100
POOLINGS = ("first", "last", "eos")


def pad_front(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """``length`` positions of ``value`` before ``x``'s dim 1 (prompt tuning makes the outputs longer)."""
    return F.pad(x, (length, 0), value=value) if length > 0 else x


class PredictionHead(nn.Sequential, abc.ABC):
    """AdapterHub's ``PredictionHead``: ``layers`` times [Dropout, Linear (+ activation)], last to the labels.

    Subclasses set ``head_type``, ``defaults`` (the keys of AdapterHub's head config for that type,
    with the head class's defaults), ``label_names`` and ``output_keys``, and implement ``compute``.
    ``pooling`` says how a sequence-level head reads one vector per sequence: ``"first"`` (the first
    token, encoders), ``"last"`` (the last token that is not padding, decoder-only models), ``"eos"``
    (the last end-of-sequence token, encoder-decoder models), as AdapterHub's model classes do.
    """

    head_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    label_names: ClassVar[tuple[str, ...]] = ("labels",)
    output_keys: ClassVar[tuple[str, ...]] = ("logits",)

    def __init__(self, name: str, config: dict[str, Any], model_config: Any) -> None:
        super().__init__()
        self.name = name
        self.config = {"head_type": self.head_type, **self.check_config(config)}
        self.pooling = "first"
        self.pad_token_id: int | None = None
        self.eos_token_id: int | None = None
        for i, module in enumerate(self.build(model_config)):
            self.add_module(str(i), module)

    # ---- config --------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """AdapterHub's config for this head type: every key, the class defaults filled in; bad values refused."""
        unknown = sorted(set(config) - set(cls.defaults) - {"head_type", "id2label"})
        if unknown:
            raise ConfigError(
                f"a {cls.head_type} head has no option(s) {unknown}; valid options: {sorted(cls.defaults)}"
            )
        out = {**cls.defaults, **{k: v for k, v in config.items() if k in cls.defaults}}
        id2label = config.get("id2label")
        if id2label is not None and "label2id" in cls.defaults:
            check(isinstance(id2label, dict), f"id2label must be a dict {{id: label}}, got {id2label!r}")
            out["label2id"] = {label: int(i) for i, label in id2label.items()}
        count = out.get("num_labels", out.get("num_choices"))
        if "label2id" in out and out["label2id"] is None and count is not None:
            out["label2id"] = {f"LABEL_{i}": i for i in range(count)}
        for key in ("num_labels", "num_choices", "layers"):
            if key in out:
                v = out[key]
                check(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                    f"{cls.head_type} head: {key} must be an int >= 1, got {v!r}",
                )
        act = out.get("activation_function")
        check(
            act is None or (isinstance(act, str) and act.lower() in activation_names()),
            f"{cls.head_type} head: unknown activation_function {act!r}; valid: {activation_names()}",
        )
        p = out.get("dropout_prob")
        check(
            p is None or (isinstance(p, (int, float)) and 0.0 <= p < 1.0),
            f"{cls.head_type} head: dropout_prob must be in [0, 1), got {p!r}",
        )
        return out

    def dropout_prob(self, model_config: Any) -> float:
        """AdapterHub's order: the head's own, the model's classifier dropout, its hidden dropout, 0."""
        if self.config.get("dropout_prob") is not None:
            return float(self.config["dropout_prob"])
        for key in ("classifier_dropout", "hidden_dropout_prob"):
            value = getattr(model_config, key, None)
            if value is not None:
                return float(value)
        return 0.0

    # ---- layers --------------------------------------------------------------------------------
    def build(self, model_config: Any) -> list[nn.Module]:
        hidden = model_config.hidden_size
        p = self.dropout_prob(model_config)
        act = self.config.get("activation_function")
        layers: list[nn.Module] = []
        n = self.config["layers"]
        for i in range(n):
            layers.append(nn.Dropout(p))
            if i < n - 1:
                layers.append(nn.Linear(hidden, hidden))
                if act:
                    layers.append(Activation(act))
            else:
                layers.append(nn.Linear(hidden, self.out_features(), bias=self.config.get("bias", True)))
        return layers

    def out_features(self) -> int:
        return self.config["num_labels"]

    def output_embeddings(self) -> nn.Linear | None:
        """The layer AdapterHub ties to the input embeddings and keeps frozen (LM heads only)."""
        return None

    # ---- forward -------------------------------------------------------------------------------
    def keys(self, with_labels: bool) -> tuple[str, ...]:
        return (("loss",) if with_labels else ()) + self.output_keys

    def sequence_vector(
        self, hidden: torch.Tensor, pooled: torch.Tensor | None, input_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """One vector per sequence, read as the model's AdapterHub class reads it."""
        if self.config.get("use_pooler"):
            return pooled
        if self.pooling == "last":
            if self.pad_token_id is None or input_ids is None:
                return hidden[:, -1]
            last = input_ids.ne(self.pad_token_id).sum(-1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.pooling == "eos" and input_ids is not None and self.eos_token_id is not None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            last = (input_ids.eq(self.eos_token_id).long() * positions).argmax(-1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return hidden[:, 0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        pooled_output: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        invertible: nn.Module | None = None,
        **labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return self.compute(hidden_states, pooled_output, input_ids, attention_mask, invertible, labels)

    @abc.abstractmethod
    def compute(
        self,
        hidden: torch.Tensor,
        pooled: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        invertible: nn.Module | None,
        labels: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The head's outputs (``keys(bool(labels))``) from the base model's outputs."""

    def layers_forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            x = module(x)
        return x
