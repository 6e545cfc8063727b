"""The adapted model's real call signature, put on its class, so the HF Trainer sees input and label names.

``transformers.Trainer`` reads the signature of ``type(model).forward`` (``find_labels``,
``can_return_loss``) and of ``model.forward`` (which dataset columns to keep). ``AdaptedModel.forward``
takes ``**kwargs``, so each AdaptedModel gets a subclass (cached, one per signature) whose ``forward``
has the base model's parameters plus the active head's label names (``labels``, or
``start_positions`` / ``end_positions``) and ``head``. Its name gains ``ForQuestionAnswering`` when a
question-answering head is active, since ``find_labels`` only takes the position names from such
classes.
"""

from __future__ import annotations

import inspect
from typing import Any

_KINDS = inspect.Parameter
_CLASSES: dict[tuple, type] = {}


def call_signature(base: Any, label_names: tuple[str, ...]) -> inspect.Signature:
    """The base model's ``forward`` signature with ``label_names`` and ``head`` as keyword-only parameters."""
    params = [
        p for p in inspect.signature(base.forward).parameters.values() if p.kind is not _KINDS.VAR_POSITIONAL
    ]
    var_kw = [p for p in params if p.kind is _KINDS.VAR_KEYWORD]
    params = [p for p in params if p.kind is not _KINDS.VAR_KEYWORD]
    names = {p.name for p in params}
    extra = [_KINDS(n, _KINDS.KEYWORD_ONLY, default=None) for n in (*label_names, "head") if n not in names]
    this = _KINDS("self", _KINDS.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([this, *params, *extra, *var_kw])


def specialize(model: Any, label_names: tuple[str, ...], question_answering: bool) -> None:
    """Give ``model`` the class whose ``forward`` signature is its real one."""
    root = getattr(type(model), "_fxadapt_root", type(model))
    sig = call_signature(model.base, label_names)
    name = root.__name__ + ("ForQuestionAnswering" if question_answering else "")
    key = (root, name, str(sig))
    cls = _CLASSES.get(key)
    if cls is None:

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return root.forward(self, *args, **kwargs)

        forward.__signature__ = sig  # type: ignore[attr-defined]
        forward.__doc__ = root.forward.__doc__
        cls = type(name, (root,), {"forward": forward, "_fxadapt_root": root, "__module__": root.__module__})
        _CLASSES[key] = cls
    if type(model) is not cls:
        model.__class__ = cls
