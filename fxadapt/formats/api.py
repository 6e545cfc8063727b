"""Saving and loading adapters (and the heads beside them) on ``AdaptedModel``: the verbs over
``formats.folder`` (one unit per folder, every format) and ``heads.files``."""

from __future__ import annotations

import os

from ..heads import files as head_files
from . import folder
from .hub import resolve


class FilesMixin:
    """``save_adapter`` and ``load_adapter`` of ``AdaptedModel``."""

    def save_adapter(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str,
        format: str = "fxadapt",
        with_head: bool = True,
    ) -> None:
        """Write one adapter into ``save_directory`` (created if missing) as one unit (``fileio.atomic_folder``).

        ``with_head``: also the head named like the adapter, or a static model's task head
        (``head_config.json`` + ``head.safetensors``, or AdapterHub's ``pytorch_model_head.bin``), in
        the same unit.

        ``format="fxadapt"``: ``adapter_config.json`` + ``adapter.safetensors``, every fxadapt option.
        ``format="adapterhub"``: what AdapterHub's ``save_adapter`` writes (``adapter_config.json`` +
        ``pytorch_adapter.bin``), so that its ``model.load_adapter(save_directory)`` loads it; an option
        AdapterHub cannot express (LoRA's ``fused_qkv="joint"`` or ``target_sites``) raises ConfigError
        before anything is written. ``format="peft"``: what PEFT's ``save_pretrained`` writes, so that
        ``PeftModel.from_pretrained`` loads it (LoRA, DoRA, (IA)^3, VeRA, prompt and prefix tuning;
        ``modules_to_save`` copies as PEFT's). See docs/formats.md.
        """
        self._names(adapter_name)
        # PEFT's format carries a task head as modules_to_save; an unknown format is refused by folder.save
        heads_too = with_head and format in head_files.FORMATS
        extra = head_files.file_bytes(self, adapter_name, format) if heads_too else None
        folder.save(self, save_directory, adapter_name, format, extra)

    def load_adapter(
        self,
        adapter_name_or_path: str | os.PathLike,
        load_as: str | None = None,
        set_active: bool = False,
        revision: str | None = None,
        with_head: bool = True,
        id2label: dict[int, str] | None = None,
    ) -> str:
        """Load an fxadapt, AdapterHub or PEFT adapter from a folder or a Hub repo id ("org/name").

        ``with_head``: also the head saved beside it (named like the adapter), activated with it.
        The model is unchanged on any error.
        """
        adapter = folder.load(self, adapter_name_or_path, load_as, revision)
        self._check_new_name(adapter.name, remedy="pass load_as='other_name', or delete_adapter() it first")
        path = resolve(adapter_name_or_path, revision)
        head = head_files.read_beside(self, path, adapter.name, id2label) if with_head else None
        self._install(adapter, set_active)
        if head is not None:
            head_files.install(self, head, set_active=set_active)
        return adapter.name
