"""Sequence-level heads: classification, multi-label classification, multiple choice, image classification.

Layer structures, config keys, defaults and losses are AdapterHub's (adapters 1.3): one vector per
sequence (first token, last token or last end-of-sequence token, or the pooler output with
``use_pooler``) through ``[Dropout, Linear(H, H), activation] * (layers - 1) + [Dropout, Linear(H, C)]``.
Losses: cross-entropy; mean squared error when ``num_labels == 1``; ``BCEWithLogits`` for multi-label
(labels cast to float).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import PredictionHead

_SEQUENCE = {
    "num_labels": 2,
    "layers": 2,
    "activation_function": "tanh",
    "label2id": None,
    "use_pooler": False,
    "bias": True,
    "dropout_prob": None,
}


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    if num_labels == 1:
        return F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
    return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))


class ClassificationHead(PredictionHead):
    head_type = "classification"
    defaults = dict(_SEQUENCE)

    def compute(self, hidden, pooled, input_ids, attention_mask, invertible, labels) -> dict[str, Any]:
        logits = self.layers_forward(self.sequence_vector(hidden, pooled, input_ids))
        out = {"logits": logits}
        if "labels" in labels:
            out["loss"] = _classification_loss(logits, labels["labels"], self.config["num_labels"])
        return out


class MultiLabelClassificationHead(PredictionHead):
    head_type = "multilabel_classification"
    defaults = dict(_SEQUENCE)

    def compute(self, hidden, pooled, input_ids, attention_mask, invertible, labels) -> dict[str, Any]:
        logits = self.layers_forward(self.sequence_vector(hidden, pooled, input_ids))
        out = {"logits": logits}
        if "labels" in labels:
            out["loss"] = F.binary_cross_entropy_with_logits(logits, labels["labels"].to(logits.dtype))
        return out


class MultipleChoiceHead(PredictionHead):
    """One score per (question, choice) sequence, viewed as ``[batch, num_choices]``.

    The inputs ``[batch, num_choices, seq]`` are flattened to ``[batch * num_choices, seq]`` before the
    base model (``AdaptedModel.forward``), as AdapterHub's model classes do.
    """

    head_type = "multiple_choice"
    defaults = {
        "num_choices": 2,
        "layers": 2,
        "activation_function": "tanh",
        "label2id": None,
        "use_pooler": False,
        "dropout_prob": None,
    }

    def out_features(self) -> int:
        return 1

    def compute(self, hidden, pooled, input_ids, attention_mask, invertible, labels) -> dict[str, Any]:
        scores = self.layers_forward(self.sequence_vector(hidden, pooled, input_ids))
        logits = scores.view(-1, self.config["num_choices"])
        out = {"logits": logits}
        if "labels" in labels:
            out["loss"] = F.cross_entropy(logits, labels["labels"])
        return out


class ImageClassificationHead(PredictionHead):
    """AdapterHub's default is ``layers=1`` in ``add_image_classification_head`` (2 in the class)."""

    head_type = "image_classification"
    defaults = {**_SEQUENCE, "multilabel": False}

    def compute(self, hidden, pooled, input_ids, attention_mask, invertible, labels) -> dict[str, Any]:
        logits = self.layers_forward(self.sequence_vector(hidden, pooled, input_ids))
        out = {"logits": logits}
        if "labels" in labels:
            y = labels["labels"]
            if self.config["num_labels"] != 1 and self.config["multilabel"]:
                out["loss"] = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
            else:
                out["loss"] = _classification_loss(logits, y, self.config["num_labels"])
        return out
