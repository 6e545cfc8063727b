"""Head files beside an adapter's: fxadapt's format and AdapterHub's, both ways.

fxadapt: ``head_config.json`` (``"format": "fxadapt"``, the head config, the model class) +
``head.safetensors``. A flexible head's tensors are named by its module index (``1.weight``), a static
model's task head by its path in the model (``classifier.weight``); weights tied to the base model
(an LM head's output embedding) are the base's and are not written.

AdapterHub: ``head_config.json`` (``config``, ``hidden_size``, ``model_class``, ``model_name``,
``model_type``, ``name``, ``version``) + ``pytorch_model_head.bin``, as its ``save_adapter(...,
with_head=True)`` writes them: a flexible head's tensors are ``heads.<name>.<index>.*`` (a tied output
embedding included, as a copy), ``model_class`` is the AdapterModel class (``BertAdapterModel``); a static
model's are every tensor outside its base model, with ``config: null``, ``label2id`` and ``num_labels``.
Reading either, a tied tensor is not written into the base model: it must equal the base's weight
(a different one is refused).

Every check happens on detached tensors before the model changes; files are written atomically.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ..errors import AdapterFileError, ConfigError
from ..formats.adapterhub import VERSION
from ..formats.fileio import atomic_write, read_tensors
from ..version import __version__
from . import static
from .base import PredictionHead
from .types import build_head

CONFIG = "head_config.json"


class HeadMismatch(AdapterFileError):
    """The file holds a kind of head this model cannot take (flexible vs static, another model class).

    ``load_adapter`` then loads the adapter alone and warns (AdapterHub's loader does the same);
    ``load_head`` raises it.
    """


WEIGHTS = "head.safetensors"
ADAPTERHUB_WEIGHTS = "pytorch_model_head.bin"
ADAPTERHUB_SAFE_WEIGHTS = "model_head.safetensors"
FORMAT = "fxadapt"
FORMATS = (FORMAT, "adapterhub")  # the formats a head is written in


def adapterhub_class(base: Any) -> str:
    """AdapterHub's flexible-head class for a model without a head: ``BertModel`` -> ``BertAdapterModel``."""
    name = type(base).__name__
    return (name[: -len("Model")] if name.endswith("Model") else name) + "AdapterModel"


def _tied(head: PredictionHead, base: Any) -> set[str]:
    """The head's state keys whose tensor is a base model parameter (a tied output embedding)."""
    base_ids = {id(p) for p in base.parameters()}
    return {k for k, p in head.named_parameters(remove_duplicate=False) if id(p) in base_ids}


def has_head(model: Any, name: str) -> bool:
    """Whether ``save_adapter(name, with_head=True)`` writes a head: a flexible head ``name``, or a static one."""
    return name in model.heads or bool(static.task_head(model.base))


# ---- writing ---------------------------------------------------------------------------------------


def file_bytes(model: Any, name: str, format: str = FORMAT) -> dict[str, bytes]:
    """Head ``name``'s (or the static task head's) files in ``format``; empty if there is none."""
    if format not in (FORMAT, "adapterhub"):
        raise ConfigError(f"unknown head file format {format!r}; valid: ['adapterhub', 'fxadapt']")
    if name in model.heads:
        weights, config = _flexible(model, name, format)
    elif static.task_head(model.base):
        weights, config = _static(model, name, format)
    else:
        return {}
    return {weights[0]: weights[1], CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def write(model: Any, directory: str | os.PathLike, name: str, format: str = FORMAT) -> None:
    """Write head ``name`` (or the static task head) into ``directory`` in ``format``; nothing if there is none."""
    if format not in (FORMAT, "adapterhub"):
        raise ConfigError(f"unknown head file format {format!r}; valid: ['adapterhub', 'fxadapt']")
    if name in model.heads:
        files = _flexible(model, name, format)
    elif static.task_head(model.base):
        files = _static(model, name, format)
    else:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    weights, config = files
    for stale in {WEIGHTS, ADAPTERHUB_WEIGHTS, ADAPTERHUB_SAFE_WEIGHTS} - {weights[0]}:
        (path / stale).unlink(missing_ok=True)
    atomic_write(path / weights[0], weights[1])
    atomic_write(path / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _meta(model: Any) -> dict[str, Any]:
    hf = model.config
    return {
        "hidden_size": getattr(hf, "hidden_size", None),
        "model_name": getattr(hf, "name_or_path", "") or "",
        "model_type": getattr(hf, "model_type", None),
    }


def _torch_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _flexible(model: Any, name: str, format: str) -> tuple[tuple[str, bytes], dict[str, Any]]:
    head = model.heads[name]
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if format == "adapterhub":
        config = {**_meta(model), "config": head.config, "model_class": adapterhub_class(model.base)}
        config.update(name=name, version=VERSION)
        return (ADAPTERHUB_WEIGHTS, _torch_bytes({f"heads.{name}.{k}": v for k, v in state.items()})), config
    tied = _tied(head, model.base)
    state = {k: v for k, v in state.items() if k not in tied}
    config = {
        "format": FORMAT,
        "version": __version__,
        "kind": "flexible",
        "name": name,
        "config": head.config,
        "tied": sorted(tied),
        "model_class": type(model.base).__name__,
    }
    return (WEIGHTS, safetensors_bytes(state, metadata={"format": "pt"})), config


def _static(model: Any, name: str, format: str) -> tuple[tuple[str, bytes], dict[str, Any]]:
    base = model.base
    hf = base.config
    labels = {"label2id": getattr(hf, "label2id", None), "num_labels": getattr(hf, "num_labels", None)}
    if format == "adapterhub":
        prefix = base.base_model_prefix + "."
        state = {k: v.detach().cpu() for k, v in base.state_dict().items() if not k.startswith(prefix)}
        config = {**_meta(model), "config": None, "model_class": type(base).__name__, **labels}
        config.update(name=name, version=VERSION)
        return (ADAPTERHUB_WEIGHTS, _torch_bytes(state)), config
    state = {k: p.detach().cpu().contiguous() for k, p in static.task_head(base).items()}
    config = {
        "format": FORMAT,
        "version": __version__,
        "kind": "static",
        "name": name,
        "model_class": type(base).__name__,
        **labels,
    }
    return (WEIGHTS, safetensors_bytes(state, metadata={"format": "pt"})), config


# ---- reading ---------------------------------------------------------------------------------------


@dataclass
class LoadedHead:
    """A head read and checked against the model, not yet installed."""

    name: str
    head: PredictionHead | None = None  # a flexible head, weights loaded
    static: dict[str, torch.Tensor] = field(default_factory=dict)  # base-relative name -> tensor
    label2id: dict[str, int] | None = None


def read_beside(
    model: Any, directory: str | os.PathLike, name: str, id2label: dict[int, str] | None = None
) -> LoadedHead | None:
    """The head saved beside an adapter, if any; one this model cannot take is skipped with a warning."""
    if not (Path(directory) / CONFIG).is_file():
        return None
    try:
        return read(model, directory, name, id2label)
    except HeadMismatch as exc:
        warnings.warn(f"{exc}. The adapter is loaded without its head.", stacklevel=3)
        return None


def read(
    model: Any, directory: str | os.PathLike, name: str | None = None, id2label: dict[int, str] | None = None
) -> LoadedHead:
    """Read the head in ``directory`` for ``model``, named ``name`` (default: the saved name), all checked."""
    path = Path(directory)
    try:
        raw = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{path / CONFIG} is missing or not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or "model_class" not in raw:
        raise AdapterFileError(f"{path / CONFIG} is not a head config (no 'model_class')")
    name = name or raw.get("name") or path.name
    native = raw.get("format") == FORMAT
    flexible = raw.get("kind") == "flexible" if native else isinstance(raw.get("config"), dict)
    if native:
        weights = path / WEIGHTS
    else:
        safe = path / ADAPTERHUB_SAFE_WEIGHTS
        weights = safe if safe.is_file() else path / ADAPTERHUB_WEIGHTS
    tensors = read_tensors(weights)
    try:
        if flexible:
            return _read_flexible(model, path, raw, tensors, name, native, id2label)
        return _read_static(model, path, raw, tensors, name, native, id2label)
    except ConfigError as exc:
        raise AdapterFileError(f"{path / CONFIG}: {exc}") from exc


def _read_flexible(model, path, raw, tensors, name, native, id2label) -> LoadedHead:
    if static.inner_model(model.base) is not None:
        raise HeadMismatch(
            f"the head in {path} is a flexible head ({raw['model_class']}), but {type(model.base).__name__} "
            "has its own task head; load it into a model without a head (AutoModel)"
        )
    config = dict(raw["config"])
    head_type = config.pop("head_type", None)
    if id2label is not None:
        config.pop("label2id", None)
        config["id2label"] = id2label
    head = build_head(name, head_type, config, model.base)
    if not native:
        prefix = f"heads.{raw.get('name')}."
        foreign = [k for k in tensors if not k.startswith(prefix)]
        if foreign:
            raise AdapterFileError(
                f"{path / ADAPTERHUB_WEIGHTS}: tensors {foreign[:4]} do not start with {prefix!r}"
            )
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    tied = _tied(head, model.base)
    targets = dict(head.named_parameters(remove_duplicate=False)) | dict(head.named_buffers())
    _check_and_copy(path, targets, tensors, tied, set(targets) - tied)
    return LoadedHead(name=name, head=head)


def _read_static(model, path, raw, tensors, name, native, id2label) -> LoadedHead:
    base = model.base
    inner = static.inner_model(base)
    if inner is None:
        raise HeadMismatch(
            f"the head in {path} is the task head of {raw['model_class']}, but {type(base).__name__} has no "
            f"head (AdapterHub's conversion of static heads to flexible ones is not implemented); "
            f"load it into {raw['model_class']}"
        )
    if not native and raw["model_class"] != type(base).__name__:
        raise HeadMismatch(
            f"the head in {path} was saved from {raw['model_class']}, not {type(base).__name__}"
        )
    inside = {id(p) for p in inner.parameters()}
    targets = {k: t for k, t in base.state_dict(keep_vars=True).items()}
    tied = {k for k, t in targets.items() if id(t) in inside}
    own = {k: t for k, t in targets.items() if not k.startswith(base.base_model_prefix + ".")}
    required = set(static.task_head(base)) if native else set(own) - tied
    _check_and_copy(path, own, tensors, tied, required, copy=False)
    label2id = raw.get("label2id")
    if id2label is not None:
        label2id = {label: int(i) for i, label in id2label.items()}
    loaded = {k: v for k, v in tensors.items() if k not in tied}
    return LoadedHead(name=name, static=loaded, label2id=label2id)


def _check_and_copy(
    path: Path,
    targets: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    tied: set[str],
    required: set[str],
    copy: bool = True,
) -> None:
    """Refuse missing, unexpected or misshapen tensors and tied ones that differ; then fill ``targets``."""
    missing = sorted(required - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(targets[k].shape)}"
        for k, v in tensors.items()
        if k in targets and v.shape != targets[k].shape
    ]
    differ = [
        k for k in tied & set(tensors) if not wrong and not torch.equal(tensors[k].to(targets[k]), targets[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:4]}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:4]}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:4]}")
    if differ:
        problems.append(
            f"tensors {differ[:4]} are tied to this model's input embeddings but differ from them "
            "(saved from another base model?)"
        )
    if problems:
        raise AdapterFileError(f"head in {path} does not fit this model: " + "; ".join(problems))
    if copy:
        with torch.no_grad():
            for k, v in tensors.items():
                if k not in tied:
                    targets[k].copy_(v)


def install(model: Any, loaded: LoadedHead, set_active: bool = True) -> None:
    """Put a checked head into the model (a flexible head, or the static head's weights)."""
    if loaded.head is not None:
        model._install_head(loaded.head, set_active)
        return
    with torch.no_grad():
        state = model.base.state_dict(keep_vars=True)
        for k, v in loaded.static.items():
            state[k].copy_(v)
    if loaded.label2id:
        model.base.config.label2id = dict(loaded.label2id)
        model.base.config.id2label = {int(i): label for label, i in loaded.label2id.items()}
