"""Prompt tuning: ``P`` trained embeddings before the input's own (Lester et al., 2021).

Config names and defaults follow AdapterHub's ``PromptTuningConfig``. The prompt ``[P, H]`` is
prepended where the hidden states enter the first layer (``passes/prompt.py``), and the attention
mask gets ``P`` ones in front, so the output is ``P`` positions longer than the input, as in
AdapterHub. The module is the adapter's only one, keyed ``prompt_tuning`` (it belongs to no
projection site); its parameter ``prompt_embedding.weight`` has AdapterHub's name. With
``placement="input_embeddings"`` (PEFT's prompt tuning) the prompt goes before the embedding block
instead (keyed ``input_embeddings``): it passes the position embeddings and the embedding norm too.

In ``BatchSplit``/``Parallel`` each block of rows gets its own prompt, left-padded with masked
positions to the longest; other blocks are refused (docs/composition.md).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn

from passes.prompt import INPUT_EMBEDDINGS, embedding_projection, insert_prompt
from passes.sites import SiteTable

from ..config import AdapterConfig, check
from ..registry import Method, register

KEY = "prompt_tuning"
INITS = ("random_uniform", "from_string")
COMBINES = ("prefix", "prefix_after_bos")
PLACEMENTS = ("layer_input", "input_embeddings")
_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("fxadapt_prompt_loading", default=False)
_LOCAL = ("tokenizer", "embeddings")


@dataclasses.dataclass
class PromptTuningConfig(AdapterConfig):
    """AdapterHub's ``PromptTuningConfig``.

    ``prompt_init="from_string"`` starts the prompt from the base model's embeddings of
    ``prompt_init_text``: a string (then pass ``tokenizer``, the model's tokenizer) or token ids,
    repeated or cut to ``prompt_length`` as AdapterHub does; ``embeddings`` is the input embedding
    table (``model.get_input_embeddings()`` or its weight). Neither is saved: a loaded adapter takes
    its prompt from the file.
    """

    architecture = "prompt_tuning"
    foreign_defaults = {"init_weights_seed": None}
    # "layer_input": AdapterHub's, after the embedding block; "input_embeddings": PEFT's, before it
    local_options = {"placement": "layer_input"}

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: str | list[int] | None = None
    combine: str = "prefix"
    random_uniform_scale: float = 0.5
    placement: str = "layer_input"
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)
    embeddings: Any = dataclasses.field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        n = self.prompt_length
        check(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1,
            f"PromptTuningConfig.prompt_length must be an int >= 1, got {n!r}",
        )
        check(self.prompt_init in INITS, f"PromptTuningConfig.prompt_init must be one of {list(INITS)}")
        check(self.combine in COMBINES, f"PromptTuningConfig.combine must be one of {list(COMBINES)}")
        check(
            self.placement in PLACEMENTS,
            f"PromptTuningConfig.placement must be one of {list(PLACEMENTS)}, got {self.placement!r}",
        )
        scale = self.random_uniform_scale
        check(
            isinstance(scale, (int, float)) and scale > 0,
            f"PromptTuningConfig.random_uniform_scale must be > 0, got {scale!r}",
        )
        text = self.prompt_init_text
        check(
            text is None
            or (isinstance(text, str) and text)
            or (isinstance(text, (list, tuple)) and text and all(isinstance(i, int) for i in text)),
            f"PromptTuningConfig.prompt_init_text must be a non-empty string or token ids, got {text!r}",
        )
        if self.prompt_init != "from_string":
            return
        check(text is not None, "prompt_init='from_string' needs prompt_init_text (a string or token ids)")
        if _LOADING.get():
            return  # the file holds the prompt
        check(
            not isinstance(text, str) or callable(self.tokenizer),
            "prompt_init_text is a string: pass the model's tokenizer (tokenizer=...) or token ids",
        )
        table = self.embedding_table()
        check(
            table is not None,
            "prompt_init='from_string' needs the base model's input embeddings: "
            "embeddings=model.get_input_embeddings() (or its weight)",
        )
        ids = self.token_ids()
        check(
            all(0 <= i < table.shape[0] for i in ids),
            f"prompt_init_text token ids {ids} are outside the embedding table ({table.shape[0]} rows)",
        )

    def embedding_table(self) -> torch.Tensor | None:
        e = self.embeddings
        table = e.weight if isinstance(e, nn.Module) and hasattr(e, "weight") else e
        return table if isinstance(table, torch.Tensor) and table.dim() == 2 else None

    def token_ids(self) -> list[int]:
        """``prompt_init_text`` as ``prompt_length`` token ids (repeated, then cut, as AdapterHub does)."""
        text = self.prompt_init_text
        if isinstance(text, str):
            encoded = self.tokenizer(text)
            ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        else:
            ids = text
        ids = [int(i) for i in ids]
        check(bool(ids), f"prompt_init_text {text!r} gives no tokens")
        ids = ids * math.ceil(self.prompt_length / len(ids))
        return ids[: self.prompt_length]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _LOCAL}
        if isinstance(out["prompt_init_text"], tuple):
            out["prompt_init_text"] = list(out["prompt_init_text"])
        out["architecture"] = self.architecture
        return out

    def to_adapterhub_dict(self) -> dict[str, Any]:
        text = self.prompt_init_text
        check(
            text is None or isinstance(text, str),
            f"PromptTuningConfig.prompt_init_text={text!r} (token ids) is fxadapt's own; AdapterHub's "
            "config takes a string, which it tokenizes again when a loaded adapter is added. Save with "
            "format='fxadapt', or use an adapter made with the text as a string",
        )
        out = super().to_adapterhub_dict()
        # AdapterHub's is a class attribute, not a field; it only draws the first prompt, and the
        # trained prompt is in the file
        del out["random_uniform_scale"]
        return out

    def replace(self, **changes: Any) -> PromptTuningConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        token = _LOADING.set(True)
        try:
            return super().from_dict(data)
        finally:
            _LOADING.reset(token)


class PromptTuning(nn.Module):
    """The prompt ``[P, H]``, prepended (or put after the first token) to the embedded input."""

    def __init__(
        self, config: PromptTuningConfig, hidden: int, dtype: torch.dtype | None = None, device: Any = None
    ) -> None:
        super().__init__()
        self.combine = config.combine
        self.prompt_embedding = nn.Embedding(config.prompt_length, hidden, dtype=dtype, device=device)
        with torch.no_grad():
            table = config.embedding_table() if config.prompt_init == "from_string" else None
            if table is not None:
                ids = torch.tensor(config.token_ids(), device=table.device)
                self.prompt_embedding.weight.copy_(table.detach()[ids])
            else:
                scale = config.random_uniform_scale
                nn.init.uniform_(self.prompt_embedding.weight, -scale, scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_embedding.weight.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        if self.combine == "prefix_after_bos":
            return torch.cat([h[:, :1], prompt, h[:, 1:]], dim=1)
        return torch.cat([prompt, h], dim=1)

    def extra_repr(self) -> str:
        n, h = self.prompt_embedding.weight.shape
        return f"length {n}, hidden {h}, combine={self.combine!r}"


def build(
    config: PromptTuningConfig, sites: SiteTable, dtype: torch.dtype, device: Any
) -> dict[str, nn.Module]:
    first = next((s for s in sites if s.layer is not None and s.roles), None)
    check(
        first is not None, "prompt tuning found no layer: cannot tell the embedding width; see model.sites()"
    )
    key = INPUT_EMBEDDINGS if config.placement == "input_embeddings" else KEY
    # the embedding block's width: before a projection to the hidden size (ALBERT), if there is one
    projection = embedding_projection(sites) if key == KEY else None
    width = projection.in_features if projection is not None else first.in_features
    table = config.embedding_table()
    if table is not None:
        check(
            table.shape[1] == width,
            f"embeddings have width {table.shape[1]}, the prompt goes where the width is {width}",
        )
    return {key: PromptTuning(config, width, dtype, device)}


_KEY = re.compile(r"^(?:.+\.)?prompt_tuning\.prompt_tunings\.[^.]+\.(?P<param>prompt_embedding\.weight)$")


def adapterhub_key(key: str, sites: Any, config: Any = None) -> str | None:
    """``prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight`` -> ``prompt_tuning.prompt_embedding.weight``."""
    m = _KEY.match(key)
    return f"{KEY}.{m['param']}" if m else None


def adapterhub_name(key: str, sites: Any, config: Any, name: str) -> str:
    """``prompt_tuning.<param>`` -> ``prompt_tuning.prompt_tunings.<name>.<param>`` (in AdapterHub's base model)."""
    return f"{KEY}.prompt_tunings.{name}.{key[len(KEY) + 1 :]}"


PROMPT_TUNING = register(
    Method(
        "prompt_tuning",
        PromptTuningConfig,
        build,
        insert_prompt,
        adapterhub_key=adapterhub_key,
        adapterhub_name=adapterhub_name,
        compose=frozenset({"rows"}),  # a prompt per row block; see passes/prompt.py
        prompt_only=True,
    )
)
