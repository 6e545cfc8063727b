"""PEFT folders (``adapter_config.json`` with ``peft_type`` + ``adapter_model.safetensors`` or ``.bin``).

Both ways go through the method's record: ``Method.from_peft`` reads its config and tensor names,
``Method.to_peft`` writes them; this module finds the method, the weights file and the parts every
PEFT type shares: ``modules_to_save`` (a task head the adapter carries its own copy of, stored under
``base_model.model.<module>``, or ``base_model.<module>`` for prompt learning), ``task_type``
(from the model's class) and the options PEFT writes that change nothing fxadapt computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ..adapter import SAVED, slot
from ..errors import AdapterFileError, ConfigError
from ..heads.static import task_head
from ..registry import method_for_peft_type, peft_types
from .fileio import CONFIG, atomic_folder, first_existing, read_tensors, write_file

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
_TASKS = (  # model class name ending -> PEFT task_type
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("MTModel", "SEQ_2_SEQ_LM"),
)


def read(path: Path, raw: dict[str, Any], sites: Any) -> tuple[str, Any, dict[str, torch.Tensor]]:
    method = method_for_peft_type(raw.get("peft_type"), raw)
    if method is None:
        raise AdapterFileError(
            f"PEFT adapter type {raw.get('peft_type')!r} is not supported; supported: {peft_types()}"
        )
    tensors = read_tensors(first_existing(path, WEIGHTS))
    saved, own = _split_saved(raw, tensors)
    config, mapped = method.from_peft(raw, own, sites)
    mapped.update({f"{SAVED}.{k}": t for k, t in saved.items()})
    return path.name, config, mapped


def _split_saved(raw: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(``{base parameter: tensor}`` of ``modules_to_save``, the method's own tensors)."""
    modules = [m for m in raw.get("modules_to_save") or [] if m]
    saved, own = {}, {}
    for key, t in tensors.items():
        short = key.removeprefix("base_model.model.").removeprefix("base_model.")
        owner = short.rsplit(".", 1)[0]
        if any(owner == m or owner.endswith("." + m) or owner.startswith(m + ".") for m in modules):
            saved[short] = t
        else:
            own[key] = t
    return saved, own


# ---- writing ---------------------------------------------------------------------------------------

# task types whose PeftModel puts the task head (classifier, score, qa_outputs) into modules_to_save
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def task_type(base: Any) -> str | None:
    """PEFT's ``task_type`` for a model class (None for a bare base model)."""
    name = type(base).__name__
    return next((task for end, task in _TASKS if name.endswith(end)), None)


def write(model: Any, directory: str | os.PathLike, name: str, extra: dict[str, bytes] | None = None) -> None:
    """Write adapter ``name`` as PEFT's ``save_pretrained`` would, for ``PeftModel.from_pretrained``.

    Everything is computed (and any refusal raised) before the folder is touched.
    """
    adapter = model.adapters[name]
    method = adapter.method
    if method.to_peft is None:
        raise ConfigError(
            f"adapter {name!r} is {method.name!r}, which PEFT has no equivalent of; save it with "
            f"format='fxadapt' (PEFT types fxadapt writes: {peft_types(writable=True)})"
        )
    config, tensors = method.to_peft(adapter, model)
    prompt_learning = config["peft_type"] in PROMPT_LEARNING
    prefix = "base_model." if prompt_learning else "base_model.model."
    modules = {p.rsplit(".", 1)[0] for p in adapter.saved_paths}
    for path in adapter.saved_paths:
        tensors[prefix + path] = adapter.saved[slot(path)]
    if task_type(model.base) in _HEAD_TASKS:  # PEFT wraps the task head in modules_to_save for these
        for path, param in task_head(model.base).items():
            if path.rsplit(".", 1)[0] not in modules:
                tensors[prefix + path] = param
        modules |= {p.rsplit(".", 1)[0] for p in task_head(model.base)}
    modules = sorted(modules)
    hf = getattr(model.base, "config", None)
    config = {
        "base_model_name_or_path": getattr(hf, "name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": modules or None,
        "revision": None,
        "task_type": task_type(model.base),
        **config,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    weights = safetensors_bytes(state, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_folder(directory) as tmp:  # one unit; drops a stale adapter_model.bin
        write_file(tmp / WEIGHTS[0], weights)
        write_file(tmp / CONFIG, text.encode())
        for file, data in (extra or {}).items():
            write_file(tmp / file, data)


def refuse_options(raw: dict[str, Any], handled: set[str], kind: str) -> None:
    """Refuse, by name, every PEFT option set to something fxadapt does not handle (math it cannot express).

    Options PEFT always writes and that change nothing once the weights exist (init schemes,
    bookkeeping) are accepted; ``handled`` are the ones the method reads.
    """
    inert = {
        "peft_type",
        "peft_version",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "modules_to_save",
        "target_modules",
        "exclude_modules",
        "init_lora_weights",
        "init_ia3_weights",
        "init_weights",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "layers_pattern",
        "layers_to_transform",
        "fan_in_fan_out",
        "qalora_group_size",
        "ensure_weight_tying",
        "save_projection",
        "projection_prng_key",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
        "encoder_hidden_size",
    }
    bad = sorted(
        k
        for k, v in raw.items()
        if k not in inert | handled and v not in (None, False, [], {}, "", "none", 0)
    )
    if bad:
        raise AdapterFileError(
            f"PEFT {kind} options {bad} change what the adapter computes and fxadapt cannot express them"
        )
