"""Capture the graphs of generation: prefill and one-token decode (and the encoder of an encoder-decoder).

Each graph is the model's own forward, wrapped so that its inputs and outputs are plain tensors
(as transformers' ``integrations/executorch.py`` wraps a model with a ``StaticCache`` for
``torch.export``), then exported and rebased like any other capture, so the same passes insert the
adapters into it:

- *prefill* ``(input_ids, attention_mask, pads, lengths) -> {logits, position_ids, key_<i>, value_<i>}``:
  the prompt with a fresh cache. Positions are ``generate``'s for a left-padded batch (``cumsum(mask) -
  1`` on the real tokens), computed in the graph from ``S`` and each row's padding and length (``[B, 1]``
  inputs, so that nothing before the layers depends on the mask) so that a pass which lengthens the sequence
  (prompt tuning) lengthens them wherever the model reads them after its insertion point (rotary
  embeddings in the layers) and not where it reads them before (GPT-2's position embeddings), exactly
  as in the model's forward graph. It returns the last position's logits and every layer's keys and
  values, which the runtime copies into the static cache. An encoder-decoder's decoder prefill reads ``encoder_hidden_states`` and the encoder's
  ``attention_mask`` and also returns the cross-attention keys and values (``cross_key_<i>``, ...).
- *decode* ``(input_ids [B, 1], attention_mask [B, L], position_ids [B, 1], cache_position [],
  key_<i>, value_<i> [B, H, L, D], ...) -> logits``: one token; the cache tensors are inputs that the
  graph writes in place (``fxadapt.generation.cache``). Batch and cache length are symbolic.
- *encoder* ``(input_ids, attention_mask) -> {encoder_hidden_states, attention_mask}`` (the mask as the
  graph leaves it: prompt tuning puts its positions in front).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ..capture import _REMEDIES, EXPORT_LOCK, Capture, _failing_frame, _rebase
from ..errors import CaptureError
from .cache import cache_outputs, graph_cache, prefill_cache, seq2seq_cache

POSITIONS = "position_ids"


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """``generate``'s position ids: ``cumsum(mask) - 1``, 0 on padding (transformers 5)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def left_padded_positions(ids: torch.Tensor, pads: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch computed from its length ``S``, ``pads`` and ``lengths`` (``[B, 1]``).

    The real tokens, the last ``lengths`` of a row, are numbered from where the padding ends: ``i - pads``;
    the positions before the first real token keep their index (padding is masked; what a pass puts in
    front, such as prompt tuning's prompt, is numbered from 0). With nothing in front this is
    ``generate``'s ``mask_positions`` on the real tokens.
    """
    index = torch.arange(ids.shape[1], device=ids.device)[None]
    return torch.where(index >= ids.shape[1] - lengths, index - pads, index)


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _last_logits(model: nn.Module) -> dict[str, Any]:
    return {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}


class Prefill(nn.Module):
    """A decoder-only model on a prompt with a fresh cache: last logits and the cache it wrote."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = tensors["input_ids"], tensors["attention_mask"]
        positions = left_padded_positions(ids, tensors["pads"], tensors["lengths"])
        cache = prefill_cache(seq2seq=False)
        out = self.m(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **_last_logits(self.m),
        )
        return {"logits": out.logits[:, -1:], POSITIONS: positions, **_named(cache_outputs(cache), "")}


class Decode(nn.Module):
    """A decoder-only model on one token per row, reading and writing the graph-input cache."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.m = model
        self.layers = layers

    def forward(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.m(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            position_ids=tensors["position_ids"],
            cache=graph_cache(tensors, self.layers),
            use_cache=True,
        )
        return out.logits


class Encoder(nn.Module):
    """An encoder-decoder's encoder, run once per ``generate`` call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = tensors["attention_mask"]
        out = self.m.get_encoder()(input_ids=tensors["input_ids"], attention_mask=mask)
        return {"encoder_hidden_states": out.last_hidden_state, "attention_mask": mask}


class DecoderPrefill(nn.Module):
    """An encoder-decoder's decoder on its first tokens: last logits, self- and cross-attention caches."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cache = prefill_cache(seq2seq=True)
        out = self.m(
            attention_mask=tensors["attention_mask"],
            decoder_input_ids=tensors["decoder_input_ids"],
            encoder_outputs=(tensors["encoder_hidden_states"],),
            cache=cache,
            use_cache=True,
        )
        n = len(cache.self_attention_cache.layers)
        kv = cache_outputs(cache)
        return {"logits": out.logits[:, -1:], **_named(kv[: 2 * n], ""), **_named(kv[2 * n :], "cross_")}


class DecoderDecode(nn.Module):
    """An encoder-decoder's decoder on one token per row, cross-attention keys and values from the cache."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.m = model
        self.layers = layers

    def forward(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.m(
            attention_mask=tensors["attention_mask"],
            decoder_input_ids=tensors["decoder_input_ids"],
            encoder_outputs=(tensors["encoder_hidden_states"],),
            cache=seq2seq_cache(tensors, self.layers),
            use_cache=True,
        )
        return out.logits


def _named(kv: list[torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{'key' if i % 2 == 0 else 'value'}_{i // 2}": t for i, t in enumerate(kv)}


_SIZES = {
    "batch": 2,
    "seq": 8,
    "target": 3,
    "source": 7,
    "cache": 13,
}  # export's stand-ins: > 1, all different


def dims(kind: str, names: list[str]) -> dict[str, dict[int, str]]:
    """Which dims of each input are symbolic: dim -> the name of its size (one name, one size)."""
    prompt = "seq" if kind in ("prefill", "encoder") else "source"
    dims: dict[str, dict[int, str]] = {}
    for name in names:
        if name == "cache_position":
            dims[name] = {}
        elif name.startswith("cross_"):
            dims[name] = {0: "batch", 2: "source"}
        elif name.startswith(("key_", "value_")):
            dims[name] = {0: "batch", 2: "cache"}
        elif name == "encoder_hidden_states":
            dims[name] = {0: "batch", 1: "source"}
        elif name == "attention_mask":
            dims[name] = {0: "batch", 1: "cache" if kind == "decode" else prompt}
        elif name == "decoder_input_ids" and kind == "decoder_prefill":
            dims[name] = {0: "batch", 1: "target"}
        elif name == "input_ids" and kind in ("prefill", "encoder"):
            dims[name] = {0: "batch", 1: "seq"}
        else:  # one per row: input_ids, decoder_input_ids, position_ids, pads, lengths [B, 1]
            dims[name] = {0: "batch"}
    return dims


def _stand_ins(example: dict[str, torch.Tensor], dims: dict[str, dict[int, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in example.items():
        shape = list(t.shape)
        for d, size in dims[name].items():
            shape[d] = _SIZES[size]
        if t.is_floating_point():
            out[name] = torch.randn(shape, dtype=t.dtype, device=t.device)
        else:
            out[name] = torch.ones(shape, dtype=t.dtype, device=t.device)
    return out


def capture_step(model: nn.Module, kind: str, example: dict[str, torch.Tensor], layers: int = 0) -> Capture:
    """Export one generation graph of ``model`` (``kind``: prefill, decode, encoder, decoder_prefill,
    decoder_decode); ``example`` gives the inputs' names, dtypes and fixed sizes."""
    wrapper = {
        "prefill": lambda: Prefill(model),
        "decode": lambda: Decode(model, layers),
        "encoder": lambda: Encoder(model),
        "decoder_prefill": lambda: DecoderPrefill(model),
        "decoder_decode": lambda: DecoderDecode(model, layers),
    }[kind]()
    symbolic = dims(kind, list(example))
    stand_ins = _stand_ins(example, symbolic)
    named = {size: Dim(size) for size in _SIZES}
    shapes = {k: {d: named[size] for d, size in symbolic[k].items()} for k in example}
    was_training = model.training
    model.train(True)  # one capture serves both modes: the eval graph drops the dropout (passes.mode)
    try:
        with EXPORT_LOCK, torch.random.fork_rng(devices=[]):
            ep = torch.export.export(wrapper, (stand_ins,), dynamic_shapes=(shapes,), strict=False)
    except Exception as exc:
        raise CaptureError(
            f"the {kind} graph of {type(model).__name__} for generate() could not be captured by "
            f"torch.export. Failing operation: {_failing_frame(exc)}. Error: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}. "
            "Known remedies: " + "; ".join(_REMEDIES[:1] + _REMEDIES[2:]) + "."
        ) from exc
    finally:
        model.train(was_training)
    return _rebase(ep, model)
