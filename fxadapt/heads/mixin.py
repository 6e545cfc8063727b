"""AdapterHub's flexible-head methods on ``AdaptedModel``: add, activate, delete, and the runtime hooks.

Heads live in ``model.heads`` (an ``nn.ModuleDict``, keys ``heads.<name>.<index>.*`` as in
AdapterHub). ``active_head`` (or ``head=`` at call time) chooses the head(s) a call runs; the graph
for that choice ends in the head's module (``attach.py``), so the head compiles with the model.
A head named like an adapter becomes active when that adapter is activated, as in AdapterHub.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import TreeSpec

from passes.bottleneck import INVERTIBLE

from ..errors import ConfigError, FxAdaptError
from . import attach, files, multi, static
from .base import PredictionHead
from .types import build_head, head_class

# token inputs AdapterHub's model classes flatten from [B, C, S] to [B*C, S] (multiple choice)
_TOKENS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class HeadsMixin:
    """Flexible prediction heads (AdapterHub's ``ModelWithFlexibleHeadsAdaptersMixin`` API)."""

    heads: nn.ModuleDict

    def _init_heads(self) -> None:
        self.heads = nn.ModuleDict()
        self._active_heads: list[str] | None = None
        self._head_block: Any = None  # a Parallel or BatchSplit of heads set as the active head

    # ---- adding heads --------------------------------------------------------------------------
    def add_classification_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 2,
        activation_function: str | None = "tanh",
        overwrite_ok: bool = False,
        multilabel: bool = False,
        id2label: dict[int, str] | None = None,
        use_pooler: bool = False,
    ) -> None:
        """Sequence classification: one vector per sequence through ``layers`` layers (MSE if 1 label)."""
        kind = "multilabel_classification" if multilabel else "classification"
        config = dict(
            num_labels=num_labels,
            layers=layers,
            activation_function=activation_function,
            id2label=id2label,
            use_pooler=use_pooler,
        )
        self._add_head(head_name, kind, config, overwrite_ok)

    def add_multi_label_classification_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 2,
        activation_function: str | None = "tanh",
        overwrite_ok: bool = False,
        id2label: dict[int, str] | None = None,
        use_pooler: bool = False,
    ) -> None:
        """``add_classification_head(..., multilabel=True)`` (AdapterHub 1.3 has only that spelling)."""
        self.add_classification_head(
            head_name, num_labels, layers, activation_function, overwrite_ok, True, id2label, use_pooler
        )

    def add_image_classification_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 1,
        activation_function: str | None = "tanh",
        overwrite_ok: bool = False,
        multilabel: bool = False,
        id2label: dict[int, str] | None = None,
        use_pooler: bool = False,
    ) -> None:
        config = dict(
            num_labels=num_labels,
            layers=layers,
            activation_function=activation_function,
            multilabel=multilabel,
            id2label=id2label,
            use_pooler=use_pooler,
        )
        self._add_head(head_name, "image_classification", config, overwrite_ok)

    def add_multiple_choice_head(
        self,
        head_name: str,
        num_choices: int = 2,
        layers: int = 2,
        activation_function: str | None = "tanh",
        overwrite_ok: bool = False,
        id2label: dict[int, str] | None = None,
        use_pooler: bool = False,
    ) -> None:
        """Inputs ``[batch, num_choices, seq]`` are flattened before the base model; logits ``[batch, num_choices]``."""
        config = dict(
            num_choices=num_choices,
            layers=layers,
            activation_function=activation_function,
            id2label=id2label,
            use_pooler=use_pooler,
        )
        self._add_head(head_name, "multiple_choice", config, overwrite_ok)

    def add_tagging_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 1,
        activation_function: str | None = "tanh",
        overwrite_ok: bool = False,
        id2label: dict[int, str] | None = None,
    ) -> None:
        config = dict(
            num_labels=num_labels, layers=layers, activation_function=activation_function, id2label=id2label
        )
        self._add_head(head_name, "tagging", config, overwrite_ok)

    def add_qa_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 1,
        activation_function: str | None = "tanh",
        overwrite_ok: bool = False,
        id2label: dict[int, str] | None = None,
    ) -> None:
        config = dict(
            num_labels=num_labels, layers=layers, activation_function=activation_function, id2label=id2label
        )
        self._add_head(head_name, "question_answering", config, overwrite_ok)

    def add_causal_lm_head(
        self,
        head_name: str,
        activation_function: str | None = "gelu",
        layers: int = 2,
        overwrite_ok: bool = False,
    ) -> None:
        """AdapterHub's causal LM head: Linear, GELU, LayerNorm, then the (tied) output embedding with a bias."""
        config = dict(layers=layers, activation_function=activation_function, layer_norm=True, bias=True)
        self._add_head(head_name, "causal_lm", config, overwrite_ok)

    def add_masked_lm_head(
        self,
        head_name: str,
        activation_function: str | None = "gelu",
        layers: int = 2,
        overwrite_ok: bool = False,
    ) -> None:
        self._add_head(
            head_name, "masked_lm", dict(layers=layers, activation_function=activation_function), overwrite_ok
        )

    def add_seq2seq_lm_head(self, head_name: str, layers: int = 1, overwrite_ok: bool = False) -> None:
        self._add_head(head_name, "seq2seq_lm", dict(layers=layers), overwrite_ok)

    def add_prediction_head_from_config(
        self, head_name: str, config: dict[str, Any], overwrite_ok: bool = False, set_active: bool = True
    ) -> None:
        """A head from AdapterHub's head config dict (``head_type`` plus that type's options)."""
        config = dict(config)
        if "head_type" not in config:
            raise ConfigError(f"head config for {head_name!r} has no 'head_type'")
        self._add_head(head_name, config.pop("head_type"), config, overwrite_ok, set_active)

    def _add_head(
        self, name: str, head_type: str, config: dict[str, Any], overwrite_ok: bool, set_active: bool = True
    ) -> None:
        head = self._new_head(name, head_type, config, overwrite_ok)
        self._install_head(head, set_active)

    def _new_head(
        self, name: str, head_type: str, config: dict[str, Any], overwrite_ok: bool
    ) -> PredictionHead:
        """A detached head for this model; every check raises before anything changes."""
        if not isinstance(name, str) or not name or "." in name or not name.isprintable():
            raise ConfigError(f"head name must be a non-empty string without dots, got {name!r}")
        if name in self.heads and not overwrite_ok:
            raise ConfigError(f"a head named {name!r} exists; pass overwrite_ok=True to replace it")
        head_class(head_type)
        if static.inner_model(self.base) is not None:
            raise ConfigError(
                f"{type(self.base).__name__} has its own task head, which train_adapter trains and save_adapter "
                "saves with the adapter; flexible heads go on a model without a head: wrap "
                f"model.{self.base.base_model_prefix} (or AutoModel.from_pretrained(...)) instead"
            )
        return build_head(name, head_type, config, self.base)

    def _install_head(self, head: PredictionHead, set_active: bool = True) -> None:
        head.train(self.training)
        self.heads[head.name] = head
        self._forget_head_graphs(head.name)
        if set_active:
            self.active_head = head.name
        else:
            self._refresh_signature()

    def delete_head(self, head_name: str) -> None:
        if head_name not in self.heads:
            raise ConfigError(f"no head named {head_name!r}; heads: {list(self.heads)}")
        del self.heads[head_name]
        self._forget_head_graphs(head_name)
        if self._active_heads and head_name in self._active_heads:
            rest = [h for h in self._active_heads if h != head_name]
            self.active_head = rest if len(rest) > 1 else (rest[0] if rest else None)  # the block goes

    # ---- choosing heads ------------------------------------------------------------------------
    @property
    def active_head(self) -> Any:
        """The head a call runs (a name); several (a list: one per channel under ``Parallel``, else each on
        the same outputs); a ``BatchSplit`` (or ``Parallel``) of heads; or None (the base model's output)."""
        if not self._active_heads:
            return None
        if self._head_block is not None:
            return self._head_block
        return self._active_heads[0] if len(self._active_heads) == 1 else list(self._active_heads)

    @active_head.setter
    def active_head(self, heads: Any) -> None:
        names, block = multi.parse(heads, self.heads)
        self._active_heads, self._head_block = names or None, block if names else None
        if len(names) == 1 and static.inner_model(self.base) is None:
            label2id = self.heads[names[0]].config.get("label2id")
            if label2id and getattr(self.base, "config", None) is not None:
                self.base.config.label2id = dict(label2id)
                self.base.config.id2label = {i: label for label, i in label2id.items()}
        self._refresh_signature()

    def get_labels_dict(self, head_name: str | None = None) -> dict[int, str] | None:
        """``{id: label}`` of a head (the active one by default)."""
        name = head_name or self.active_head
        if not isinstance(name, str) or name not in self.heads:
            raise ConfigError(f"no head named {name!r}; heads: {list(self.heads)}")
        label2id = self.heads[name].config.get("label2id")
        return {i: label for label, i in label2id.items()} if label2id else None

    def get_labels(self, head_name: str | None = None) -> list[str] | None:
        labels = self.get_labels_dict(head_name)
        return list(labels.values()) if labels else None

    def _heads_of(self, setup: Any) -> Any:
        """The head setup activating ``setup`` brings (``multi.from_setup``; None: the active one stays),
        checked against ``setup`` so that a misfit is refused before anything changes."""
        heads = multi.from_setup(setup, self.heads)
        names, block = (
            multi.parse(heads, self.heads) if heads is not None else (self._active_heads, self._head_block)
        )
        if names and setup is not None:
            multi.layout(names, block, multi.channels_of(setup), setup)
        return heads

    def _used_heads(self, head: Any) -> tuple[list[str], Any]:
        """The heads a call runs (``head=`` or the active ones) and the block that places them."""
        if head is None:
            return list(self._active_heads or []), self._head_block
        return multi.parse(head, self.heads, "head=")

    # ---- runtime hooks -------------------------------------------------------------------------
    def _head_call(
        self, kwargs: dict[str, Any], routed: bool = False
    ) -> tuple[dict[str, Any], attach.HeadSetup | None, dict[str, torch.Tensor]]:
        """Split a call into the base model's arguments, the head setup and the head's label tensors.

        ``routed``: the call routes rows (``adapter_names=``) instead of running the active setup.
        """
        kwargs = dict(kwargs)
        used, block = self._used_heads(kwargs.pop("head", None))
        if not used:
            if self.heads and "labels" in kwargs and "labels" not in self._base_parameters():
                raise FxAdaptError(
                    f"labels were given but no head is active; heads: {list(self.heads)}. Set "
                    "model.active_head, pass head=<name>, or activate the adapter named like the head"
                )
            return kwargs, None, {}
        for name in _TOKENS:
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 3:
                kwargs[name] = t.reshape(-1, t.shape[-1])
        embeds = kwargs.get("inputs_embeds")
        if isinstance(embeds, torch.Tensor) and embeds.dim() == 4:
            kwargs["inputs_embeds"] = embeds.reshape(-1, *embeds.shape[-2:])
        wanted = {n for h in used for n in self.heads[h].label_names}
        labels = {n: kwargs.pop(n) for n in sorted(wanted) if n in kwargs}
        labels = {n: t for n, t in labels.items() if t is not None}
        bad = [n for n, t in labels.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise ConfigError(f"head labels {bad} must be tensors")
        as_tuple = kwargs.pop("return_dict", None) is False
        channels = 1 if routed else multi.channels_of(self._active)
        kind = multi.call_layout([self.heads[h] for h in used], block, channels, self._active, kwargs)
        setup = attach.HeadSetup(
            tuple(used), attach.label_signature(labels), as_tuple, self._invertible_target(), kind
        )
        return kwargs, setup, labels

    def _base_parameters(self) -> set[str]:
        return set(inspect.signature(self.base.forward).parameters)

    def _invertible_target(self) -> str | None:
        active = self._active
        names = [] if active is None else [active] if isinstance(active, str) else active.flatten()
        for name in names:
            adapter = self.adapters[name]
            if INVERTIBLE in adapter.site_keys:
                return adapter.target(INVERTIBLE)
        return None

    def _attach_heads(
        self,
        graph: fx.Graph,
        input_names: tuple[str, ...],
        out_spec: TreeSpec,
        setup: attach.HeadSetup | None,
    ) -> tuple[tuple[str, ...], TreeSpec]:
        """The head pass of ``_build``: the graph's new input names and output spec."""
        if setup is None:
            return input_names, out_spec
        return attach.attach(graph, input_names, out_spec, dict(self.heads.items()), setup)

    def _forget_head_graphs(self, name: str) -> None:
        stale = [k for k in self._runners if k[-1] is not None and name in k[-1].heads]
        for k in stale:
            del self._runners[k]

    # ---- files ---------------------------------------------------------------------------------
    def save_head(
        self, save_directory: str | os.PathLike, head_name: str | None = None, format: str = "fxadapt"
    ) -> None:
        """Write one head (the active one by default; a static model's task head if it has no flexible head)."""
        name = head_name or self.active_head
        if isinstance(name, str) and name in self.heads:
            files.write(self, save_directory, name, format)
        elif head_name is None and not self.heads and static.task_head(self.base):
            files.write(self, save_directory, "default", format)
        else:
            raise ConfigError(f"no head named {name!r}; heads: {list(self.heads)}")

    def load_head(
        self,
        save_directory: str | os.PathLike,
        load_as: str | None = None,
        id2label: dict[int, str] | None = None,
        set_active: bool = True,
    ) -> str:
        """Read a head written by ``save_head`` / ``save_adapter`` (fxadapt's or AdapterHub's); the model is
        unchanged on any error."""
        loaded = files.read(self, save_directory, load_as, id2label)
        files.install(self, loaded, set_active)
        return loaded.name

    def save_all_heads(self, save_directory: str | os.PathLike, format: str = "fxadapt") -> None:
        """One subfolder per flexible head (AdapterHub's layout)."""
        for name in self.heads:
            self.save_head(Path(save_directory) / name, name, format)

    def save_all_adapters(
        self, save_directory: str | os.PathLike, with_head: bool = True, format: str = "fxadapt"
    ) -> None:
        """One subfolder per adapter, each with its head when ``with_head`` (AdapterHub's layout)."""
        for name in self.adapters:
            self.save_adapter(Path(save_directory) / name, name, format=format, with_head=with_head)

    # ---- training ------------------------------------------------------------------------------
    def _head_parameters(self, train_head: bool, train_embeddings: bool) -> list[nn.Parameter]:
        """What ``train_adapter(train_head=True)`` unfreezes: the active flexible heads, or the static task head.

        The output embedding layer of an LM head stays frozen unless ``train_embeddings`` (AdapterHub's
        ``freeze_embeddings``), and weights tied to the base model's are never unfrozen here.
        """
        base_ids = {id(p) for p in self.base.parameters()}
        params = list(static.task_head(self.base).values()) if train_head else []
        for name in self._active_heads or [] if train_head else []:
            head = self.heads[name]
            frozen = set()
            if not train_embeddings and head.output_embeddings() is not None:
                frozen = {id(p) for p in head.output_embeddings().parameters()}
            params += [p for p in head.parameters() if id(p) not in frozen and id(p) not in base_ids]
        if train_embeddings:
            params += static.embedding_params(self.base)
        return params
