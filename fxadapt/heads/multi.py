"""Several heads in one call: which heads a composition activates, and how they share the batch.

AdapterHub's rules (adapters 1.3, ``parse_heads_from_composition`` and ``forward_head``), so that a
setup written for AdapterHub returns the same outputs here:

- activating a setup activates the head named like its last adapter (a ``Stack``'s last child);
- a ``Parallel`` activates one head per branch (each branch's last adapter): the batch is repeated
  once per channel, head ``i`` reads channel ``i``'s rows, every head gets the same labels;
- a ``BatchSplit`` activates a ``BatchSplit`` of heads: head ``i`` reads its block of rows and its
  rows of the labels;
- both return a ``MultiHeadOutput`` whose ``loss`` is the sum of the heads' losses; a plain list of
  heads without either runs every head on the same outputs, with no combined loss.

A layout is the hashable part of a graph's key that says which of these a call runs: ``()`` (one
head, or heads on the same outputs), ``PARALLEL``, or ``("rows", *batch_sizes)``.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import torch

from ..compose.blocks import AdapterCompositionBlock, BatchSplit, Parallel, Stack
from ..errors import ConfigError

PARALLEL = ("parallel",)
ROWS = "rows"


def parse(heads: Any, known: Container[str], what: str = "active_head = ") -> tuple[list[str], Any]:
    """``active_head``'s value as (head names, the ``Parallel`` / ``BatchSplit`` placing them, or None)."""
    names, block = _parse(heads)
    unknown = [h for h in names if h not in known]
    if unknown:
        raise ConfigError(f"{what}{heads!r}: no head named {unknown}; heads: {list(known)}")
    return names, block


def _parse(heads: Any) -> tuple[list[str], Any]:
    if heads is None:
        return [], None
    if isinstance(heads, str):
        return [heads], None
    if isinstance(heads, (Parallel, BatchSplit)):
        blocks = [c for c in heads.children if not isinstance(c, str)]
        if blocks:
            raise ConfigError(
                f"a head setup {heads!r} holds head names only, got {blocks[0]!r}; name one head per branch"
            )
        return list(heads.children), heads
    if isinstance(heads, AdapterCompositionBlock) or not isinstance(heads, Sequence):
        raise ConfigError(
            "active_head must be a head name, a list of names, or a Parallel / BatchSplit of names, "
            f"got {heads!r}"
        )
    names = list(heads)
    bad = [h for h in names if not isinstance(h, str)]
    if bad:
        raise ConfigError(f"active_head: {bad[0]!r} is not a head name; pass names (str)")
    return names, None


def channels_of(setup: Any) -> int:
    """How many copies of the batch the adapter setup makes (``Parallel``), 1 otherwise."""
    return setup.parallel_channels if isinstance(setup, AdapterCompositionBlock) else 1


def from_setup(setup: Any, heads: Container[str]) -> Any:
    """The head setup activating ``setup`` brings (AdapterHub's inference), or None to keep the active one.

    A ``Parallel`` or ``BatchSplit`` whose branches have heads for some but not all of them is refused:
    half of the branches would have nowhere to go.
    """
    final = setup.children[-1] if isinstance(setup, Stack) else setup
    if isinstance(final, str):
        return final if final in heads else None
    if not isinstance(final, (Parallel, BatchSplit)):
        return None  # Fuse, Split, Average, Sum: the active head stays (AdapterHub)
    names = [c if isinstance(c, str) else c.last() for c in final.children]
    missing = [n for n in names if n not in heads]
    if not missing:
        return names if isinstance(final, Parallel) else BatchSplit(*names, batch_sizes=final.batch_sizes)
    if len(missing) < len(names):
        raise ConfigError(
            f"{final!r}: branch(es) {missing} have no head named like them (heads: {list(heads)}); with "
            "heads on the other branches each branch needs its own: add one named like the branch's last "
            f"adapter (e.g. add_classification_head({missing[0]!r}, ...))"
        )
    return None


def layout(names: list[str], block: Any, channels: int, setup: Any) -> tuple:
    """How ``names`` (placed by ``block``) run after ``setup``, which repeats the batch ``channels`` times.

    Raises ConfigError when they cannot: a ``Parallel`` needs one head per channel.
    """
    if isinstance(block, BatchSplit):
        return (ROWS, *block.batch_sizes)
    if channels > 1 or isinstance(block, Parallel):
        if len(names) != channels:
            runs = (
                f"{setup!r} repeats the batch {channels} times"
                if channels > 1
                else f"{setup!r} is no Parallel"
            )
            raise ConfigError(
                f"the head setup {block or names!r} has {len(names)} head(s) for Parallel channels, but the "
                f"adapter setup {runs}: name one head per channel (heads named like the Parallel branches "
                "are activated with it), or set model.active_head = None for the base model's output"
            )
        return PARALLEL
    return ()


def call_layout(heads: list[Any], block: Any, channels: int, setup: Any, kwargs: dict[str, Any]) -> tuple:
    """The layout of a call's heads (``layout``), refused if its rows do not add up to a ``BatchSplit`` of heads."""
    kind = layout([h.name for h in heads], block, channels, setup)
    if not kind or kind[0] != ROWS:
        return kind
    ref = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None), None)
    rows = int(ref.shape[0]) if isinstance(ref, torch.Tensor) and ref.dim() > 0 else None
    if any(h.head_type == "multiple_choice" for h in heads):
        raise ConfigError(
            "a BatchSplit of heads cannot hold a multiple-choice head: its rows are choices while its labels "
            "are questions; run it alone (head='name')"
        )
    sizes = kind[1:]
    if rows is not None and sum(sizes) != rows * channels:
        raise ConfigError(
            f"the BatchSplit of heads has batch_sizes {list(sizes)} (sum {sum(sizes)}), but the model's output "
            f"has {rows * channels} rows; they must add up to the batch size"
        )
    return kind
