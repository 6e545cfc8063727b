"""Language-modeling heads: causal LM, masked LM and seq2seq LM, in AdapterHub's structure.

``[Linear(H, E), activation, LayerNorm(E)] * (layers - 1) + [Linear(E, V)]`` (no dropout). The last
layer is the output embedding: its weight is the input embedding matrix when the model ties them
(``config.tie_word_embeddings``), and ``train_adapter`` keeps it frozen unless ``train_embeddings``.
An active invertible adapter runs in reverse just before it. AdapterHub's ``add_causal_lm_head``
builds ``layers=2`` with GELU, LayerNorm and a bias (not the model's plain ``lm_head``); its LayerNorm
eps is ``config.layer_norm_eps`` or 1e-12 (GPT-2's config has another name for it, so 1e-12 there).
Loss: cross-entropy (ignore index -100), on logits and labels shifted by one when ``shift_labels``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from ..methods.activations import Activation
from .base import IGNORE_INDEX, PredictionHead, pad_front

_LM = {
    "vocab_size": None,
    "embedding_size": None,
    "layers": 1,
    "activation_function": None,
    "layer_norm": False,
    "bias": False,
    "shift_labels": True,
    "label2id": None,
    "dropout_prob": None,
}


class CausalLMHead(PredictionHead):
    head_type = "causal_lm"
    defaults = dict(_LM)

    def __init__(self, name: str, config: dict[str, Any], model_config: Any) -> None:
        config = dict(config)
        config.setdefault("vocab_size", None)
        if config["vocab_size"] is None:
            config["vocab_size"] = model_config.vocab_size
        if "embedding_size" in self.defaults and config.get("embedding_size") is None:
            config["embedding_size"] = getattr(model_config, "embedding_size", model_config.hidden_size)
        super().__init__(name, config, model_config)

    def build(self, model_config: Any) -> list[nn.Module]:
        hidden = model_config.hidden_size
        width = self.config.get("embedding_size") or hidden
        act = self.config.get("activation_function")
        layers: list[nn.Module] = []
        for i in range(self.config["layers"] - 1):
            layers.append(nn.Linear(hidden if i == 0 else width, width))
            if act:
                layers.append(Activation(act))
            if self.config.get("layer_norm"):
                layers.append(nn.LayerNorm(width, eps=getattr(model_config, "layer_norm_eps", 1e-12)))
        layers.append(nn.Linear(width, self.config["vocab_size"], bias=self.config["bias"]))
        return layers

    def output_embeddings(self) -> nn.Linear:
        return self[len(self) - 1]

    def compute(self, hidden, pooled, input_ids, attention_mask, invertible, labels) -> dict[str, Any]:
        x = hidden
        for i in range(len(self) - 1):
            x = self[i](x)
        if invertible is not None:
            x = invertible(x, rev=True)
        logits = self[len(self) - 1](x)
        out = {"logits": logits}
        if "labels" in labels:
            y = labels["labels"]
            scores = logits
            if self.config["shift_labels"]:
                scores, y = logits[..., :-1, :], y[..., 1:]
            y = pad_front(y, scores.shape[1] - y.shape[1], IGNORE_INDEX)
            out["loss"] = F.cross_entropy(
                scores.reshape(-1, self.config["vocab_size"]), y.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return out


class MaskedLMHead(CausalLMHead):
    """AdapterHub's ``BertStyleMaskedLMHead``: layers 2, GELU, LayerNorm, bias, no shift."""

    head_type = "masked_lm"
    defaults = {
        **{k: v for k, v in _LM.items() if k != "dropout_prob"},
        "layers": 2,
        "activation_function": "gelu",
        "layer_norm": True,
        "bias": True,
        "shift_labels": False,
    }


class Seq2SeqLMHead(CausalLMHead):
    """A single ``Linear(H, V)`` on the decoder's hidden states (tied to the shared embeddings), no shift."""

    head_type = "seq2seq_lm"
    defaults = {k: v for k, v in _LM.items() if k not in ("dropout_prob", "embedding_size")} | {
        "shift_labels": False
    }
