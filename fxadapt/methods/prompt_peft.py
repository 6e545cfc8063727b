"""Prompt tuning's and prefix tuning's PEFT files, both ways (PEFT's "prompt learning" types).

PEFT's prompt tuning passes ``cat(prompt, embed(input_ids))`` to the model as ``inputs_embeds``: the
prompt then passes the embedding block (position embeddings, norm, scale). fxadapt's
``placement="input_embeddings"`` puts it there too; AdapterHub's ``"layer_input"`` (after the
embedding block) is the same only where the first layer reads the word embeddings as they are
(Llama, Mistral, Qwen, ...), and is written to PEFT only there.

PEFT's prefix tuning passes the prefix keys and values as ``past_key_values``, so the model numbers
the real tokens after the prefix; fxadapt's ``positions="before_tokens"`` does the same (through
``position_ids``), AdapterHub's ``"none"`` does not and is never written to PEFT.

Encoder-decoder files (a prompt for each stack) are refused. PEFT's tensor is ``prompt_embeddings``:
``[P, hidden]`` (prompt) or ``[P, layers·2·W]`` (prefix: the computed keys and values, row ``2l``
layer ``l``'s key, fxadapt's flat prefix layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

from passes.attention import attention_layers
from passes.prompt import INPUT_EMBEDDINGS, embedding_site

from ..config import check
from ..errors import AdapterFileError, ConfigError
from ..formats.peft import refuse_options
from ..registry import METHODS, register
from .prefix_tuning import PrefixTuningFlatConfig
from .prompt_tuning import PromptTuningConfig

aten = torch.ops.aten
_THROUGH = {
    aten.dropout.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.clone.default,
    aten.alias.default,
}
_PROMPT_OPTIONS = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads"}
_PROMPT_OPTIONS |= {"num_layers", "prefix_projection"}


def check_one_stack(sites: Any) -> None:
    """Refuse an encoder-decoder: PEFT's prompt learning puts a prompt in both stacks there."""
    if any(layer.location == "cross" for layer in attention_layers(sites)):
        raise ConfigError(
            "PEFT's prompt learning on an encoder-decoder puts a prompt in both stacks; fxadapt reads and "
            "writes PEFT prompt/prefix files for decoder-only and encoder-only models"
        )


def check_same_embeddings(sites: Any) -> None:
    """Refuse a model whose first layer does not read the word embeddings as they are."""
    graph: fx.Graph | None = getattr(sites, "graph", None)
    if graph is None:
        raise ConfigError("PEFT prompt learning files need the model's graph: load them into an AdaptedModel")
    node = embedding_site(graph, sites)
    while node.op == "call_function" and node.target in _THROUGH:
        node = node.args[0]
    ids = node.args[1] if node.op == "call_function" and node.target is aten.embedding.default else None
    while isinstance(ids, fx.Node) and ids.op == "call_function" and "view" in str(ids.target):
        ids = ids.args[0]
    if not (isinstance(ids, fx.Node) and ids.op == "placeholder"):
        raise ConfigError(
            "on this model the first layer does not read the word embeddings as they are (it reads "
            f"{node.format_node()}: position embeddings, a norm or a scale come first), so a prompt "
            "placed as AdapterHub places it (placement='layer_input') is not PEFT's; use "
            "placement='input_embeddings' (PEFT's) or format='fxadapt'"
        )


def _head_dim(model: Any, width: int) -> int:
    cfg = model.base.config
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    check(dim is not None and width % dim == 0, "cannot tell the model's head dim for PEFT's prefix config")
    return dim


def _task(model: Any) -> str:
    from ..formats.peft import task_type

    return task_type(model.base) or "FEATURE_EXTRACTION"


# ---- prompt tuning --------------------------------------------------------------------------------


def prompt_to_peft(adapter: Any, model: Any) -> tuple[dict, dict]:
    config = adapter.config
    check(
        config.combine == "prefix",
        f"prompt tuning with combine={config.combine!r} has no PEFT equivalent (PEFT prepends)",
    )
    sites = model.sites()
    check_one_stack(sites)
    if config.placement == "layer_input":
        check_same_embeddings(sites)
    ((_, module),) = list(adapter.items())
    weight = module.prompt_embedding.weight.detach()
    layers = {s.layer for s in sites if s.layer is not None}
    out = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _task(model),
        "num_virtual_tokens": weight.shape[0],
        "token_dim": weight.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model.base.config, "num_attention_heads", None),
        "num_layers": len(layers),
        "prompt_tuning_init": "RANDOM",
    }
    return out, {"prompt_embeddings": weight}


def prompt_from_peft(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[Any, dict]:
    refuse_options(raw, _PROMPT_OPTIONS, "prompt tuning")
    _one_stack(raw)
    check_one_stack(sites)
    weight = _only(tensors, "prompt tuning")
    config = PromptTuningConfig(prompt_length=weight.shape[0], placement="input_embeddings")
    return config, {f"{INPUT_EMBEDDINGS}.prompt_embedding.weight": weight}


def _one_stack(raw: dict[str, Any]) -> None:
    if int(raw.get("num_transformer_submodules") or 1) != 1:
        raise AdapterFileError(
            "PEFT option num_transformer_submodules=2: an encoder-decoder prompt, which fxadapt does not read"
        )


def _only(tensors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterFileError(f"a PEFT {kind} file holds 'prompt_embeddings' only, got {sorted(tensors)}")
    return tensors["prompt_embeddings"]


# ---- prefix tuning --------------------------------------------------------------------------------


def prefix_to_peft(adapter: Any, model: Any) -> tuple[dict, dict]:
    config = adapter.config
    check(not config.use_gating, "a gated prefix (use_gating=True) has no PEFT equivalent")
    check(not config.leave_out, "PEFT's prefix tuning covers every layer: leave_out has no PEFT equivalent")
    check(
        config.dropout == 0,
        "PEFT's prefix tuning has no prefix dropout: save with dropout=0 or format='fxadapt'",
    )
    check(
        config.positions == "before_tokens",
        "this prefix has no positions (AdapterHub's positions='none'); PEFT's prefix takes positions 0..P-1 "
        "and numbers the tokens after it, which changes every attention score under position embeddings "
        "or rotary; use positions='before_tokens' (PEFT's) or format='fxadapt'",
    )
    sites = model.sites()
    check_one_stack(sites)
    ((key, module),) = list(adapter.items())
    values = module.values().detach()  # [P, 2·layers, W]
    width = values.shape[-1]
    flat = values.reshape(values.shape[0], -1)
    out = {
        "peft_type": "PREFIX_TUNING",
        "task_type": _task(model),
        "num_virtual_tokens": values.shape[0],
        "token_dim": width,
        "num_transformer_submodules": 1,
        "num_attention_heads": width // _head_dim(model, width),
        "num_layers": values.shape[1] // 2,
        "encoder_hidden_size": module.hidden,
        "prefix_projection": False,
    }
    return out, {"prompt_embeddings": flat}


def prefix_from_peft(raw: dict[str, Any], tensors: dict[str, torch.Tensor], sites: Any) -> tuple[Any, dict]:
    refuse_options(raw, _PROMPT_OPTIONS, "prefix tuning")
    _one_stack(raw)
    check_one_stack(sites)
    flat = _only(tensors, "prefix tuning")
    layers = [layer for layer in attention_layers(sites) if layer.location == "self"]
    width = layers[0].width if layers else 0
    if flat.shape[1] != len(layers) * 2 * width:
        raise AdapterFileError(
            f"PEFT prefix of width {flat.shape[1]} does not fit this model ({len(layers)} layers x 2 x {width})"
        )
    config = PrefixTuningFlatConfig(prefix_length=flat.shape[0], positions="before_tokens")
    return config, {f"{layers[0].key}.control_trans": flat.reshape(-1)}


def _with_peft(name: str, peft_type: str, reader, writer, **more) -> None:
    register(
        dataclasses.replace(METHODS[name], peft_type=peft_type, from_peft=reader, to_peft=writer, **more)
    )


_with_peft("prompt_tuning", "PROMPT_TUNING", prompt_from_peft, prompt_to_peft)
_with_peft("prefix_tuning_flat", "PREFIX_TUNING", prefix_from_peft, prefix_to_peft)
_with_peft("prefix_tuning", "PREFIX_TUNING", prefix_from_peft, prefix_to_peft, peft_when=lambda raw: False)
