"""Token-level heads: tagging (token classification) and extractive question answering.

AdapterHub's structures (``layers=1`` by default: ``[Dropout, Linear(H, C)]`` on every token) and
losses: tagging takes cross-entropy over the positions whose attention mask is 1; question answering
splits the logits into start and end, clamps the positions to ``[0, S]`` and averages the two
cross-entropies with ``ignore_index=S``. Under prompt tuning the outputs are ``P`` positions longer
than the inputs: the labels get ``P`` ignored positions in front and the mask ``P`` ones, as in
AdapterHub.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import IGNORE_INDEX, PredictionHead, pad_front

_TOKEN = {
    "num_labels": 2,
    "layers": 1,
    "activation_function": "tanh",
    "label2id": None,
    "dropout_prob": None,
}


class TaggingHead(PredictionHead):
    head_type = "tagging"
    defaults = dict(_TOKEN)

    def compute(self, hidden, pooled, input_ids, attention_mask, invertible, labels) -> dict[str, Any]:
        logits = self.layers_forward(hidden)
        out = {"logits": logits}
        if "labels" in labels:
            y = labels["labels"]
            extra = logits.shape[1] - y.shape[1]
            y = pad_front(y, extra, IGNORE_INDEX)
            n = self.config["num_labels"]
            if attention_mask is not None:
                active = pad_front(attention_mask, extra, 1).reshape(-1) == 1
                y = torch.where(active, y.reshape(-1), torch.full_like(y.reshape(-1), IGNORE_INDEX))
            out["loss"] = F.cross_entropy(logits.reshape(-1, n), y.reshape(-1), ignore_index=IGNORE_INDEX)
        return out


class QuestionAnsweringHead(PredictionHead):
    """``start_logits`` and ``end_logits`` ``[B, S]``; padded positions are not masked (as in AdapterHub).

    AdapterHub clamps ``start_positions`` / ``end_positions`` in place (the caller's tensors change);
    fxadapt computes the same loss on clamped copies and leaves the caller's tensors alone.
    """

    head_type = "question_answering"
    defaults = dict(_TOKEN)
    label_names = ("start_positions", "end_positions")
    output_keys = ("start_logits", "end_logits")

    def compute(self, hidden, pooled, input_ids, attention_mask, invertible, labels) -> dict[str, Any]:
        logits = self.layers_forward(hidden)
        start, end = logits.split(1, dim=-1)
        start, end = start.squeeze(-1), end.squeeze(-1)
        out = {"start_logits": start, "end_logits": end}
        if "start_positions" in labels and "end_positions" in labels:
            ignored = start.shape[1]
            s = labels["start_positions"].reshape(-1).clamp(0, ignored)
            e = labels["end_positions"].reshape(-1).clamp(0, ignored)
            loss_start = F.cross_entropy(start, s, ignore_index=ignored)
            loss_end = F.cross_entropy(end, e, ignore_index=ignored)
            out["loss"] = (loss_start + loss_end) / 2
        return out
