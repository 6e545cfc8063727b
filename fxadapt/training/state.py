"""What an AdaptedModel's state dict holds: the parts fxadapt adds and whatever is trainable, not the frozen base.

``state_dict()`` holds the adapters, the flexible heads (less weights tied to the base model, such as
an LM head's output embedding), a static model's task head (``classifier``, ``score``, ...), and any
other base parameter that requires grad. So ``transformers.Trainer``, which saves a plain module's
``state_dict()`` in each checkpoint and restores it with ``load_state_dict(..., strict=False)``
(``resume_from_checkpoint``, ``load_best_model_at_end``), writes and restores only those, exactly.
The frozen base model's weights are the base model's: ``model.base.state_dict()`` /
``model.base.save_pretrained``. ``load_state_dict`` also accepts base keys (a full state dict).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from itertools import chain
from typing import Any

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..heads import static
from . import signature

_OWN = ("adapters.", "heads.")


class TrainingMixin:
    """State dict, call signature and loss-kwargs flag for trainers (HF Trainer, accelerate, DDP)."""

    _keys_to_ignore_on_save = None  # read by the HF Trainer after a load

    def trainable_state_names(self) -> list[str]:
        """The keys ``state_dict()`` holds (see the module docstring)."""
        base_ids = {id(t) for t in chain(self.base.parameters(), self.base.buffers())}
        task = {f"base.{n}" for n in static.task_head(self.base)}
        own = set()
        named = chain(
            self.named_parameters(remove_duplicate=False), self.named_buffers(remove_duplicate=False)
        )
        for name, t in named:
            if name.startswith(_OWN):
                if id(t) not in base_ids:
                    own.add(name)
            elif name.startswith("base.") and (name in task or (t.requires_grad and t.is_floating_point())):
                own.add(name)
        return [k for k in nn.Module.state_dict(self) if k in own]

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        full = nn.Module.state_dict(self, prefix=prefix, keep_vars=keep_vars)
        own = {prefix + k for k in self.trainable_state_names()}
        out = OrderedDict((k, v) for k, v in full.items() if k in own)
        if destination is None:
            return out
        destination.update(out)
        return destination

    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load the trainable parts (and any base weights given); ``strict`` checks the trainable keys."""
        known = set(nn.Module.state_dict(self))
        missing = sorted(set(self.trainable_state_names()) - set(state_dict))
        unexpected = sorted(set(state_dict) - known)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}"
            )
        nn.Module.load_state_dict(self, {k: v for k, v in state_dict.items() if k in known}, False, assign)
        return _IncompatibleKeys(missing, unexpected)

    # ---- what trainers read --------------------------------------------------------------------
    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the loss is normalised by ``num_items_in_batch`` (the Trainer then skips its own scaling).

        A flexible head's loss is a mean per batch (as in AdapterHub); a static model's is its own.
        """
        if self._active_heads:
            return False
        own = getattr(type(self.base), "accepts_loss_kwargs", None)
        if own is not None:
            return bool(own)
        params = inspect.signature(self.base.forward).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    @property
    def main_input_name(self) -> str:
        return getattr(self.base, "main_input_name", "input_ids")

    def _refresh_signature(self) -> None:
        heads = [self.heads[h] for h in self._active_heads or []]
        labels = tuple(dict.fromkeys(n for h in heads for n in h.label_names))
        qa = any(h.head_type == "question_answering" for h in heads)
        qa = qa or "QuestionAnswering" in type(self.base).__name__
        signature.specialize(self, labels, qa)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle (and deepcopy) as the root class: the per-signature subclass is not importable
        reduced = list(super().__reduce_ex__(protocol))
        root = getattr(type(self), "_fxadapt_root", None)
        if root is not None and reduced[1] and reduced[1][0] is type(self):
            reduced[0], reduced[1] = _new_instance, (root,)  # not copyreg.__newobj__: it checks the class
        return tuple(reduced)


def _new_instance(cls: type) -> Any:
    """An empty instance of ``cls`` for unpickling (its state follows)."""
    return cls.__new__(cls)
