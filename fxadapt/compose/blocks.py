"""Composition blocks: ``Stack``, ``Fuse``, ``Split``, ``BatchSplit``, ``Parallel``, ``Average`` (AdapterHub's), ``Sum`` (PEFT's).

A block is data: its children (adapter names or blocks) and its options. ``passes/compose`` expands
it into graph nodes at every site. Constructors, names and nesting rules are AdapterHub 1.3's, so a
setup written for AdapterHub means the same here; ``Sum`` is PEFT's reading of several active
adapters (their updates add up), which AdapterHub does not have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ConfigError


class AdapterCompositionBlock(Sequence):
    """The common part of every block: children, traversal, equality, serialisation."""

    def __init__(self, *children: Any) -> None:
        self.children = [parse_composition(c, level=None) for c in children]

    def __getitem__(self, i: int) -> Any:
        return self.children[i]

    def __len__(self) -> int:
        return len(self.children)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.children)

    def _options(self) -> tuple:
        return ()

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.children == other.children  # type: ignore[attr-defined]
            and self._options() == other._options()  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.children), self._options()))

    def __repr__(self) -> str:
        args = [repr(c) for c in self.children] + [f"{k}={v!r}" for k, v in self._kwargs().items()]
        return f"{type(self).__name__}({', '.join(args)})"

    def _kwargs(self) -> dict[str, Any]:
        return {}

    def first(self) -> str:
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    def flatten(self) -> list[str]:
        """Every adapter name, in order, each once."""
        out: list[str] = []
        for c in self.children:
            for name in [c] if isinstance(c, str) else c.flatten():
                if name not in out:
                    out.append(name)
        return out

    def leaves(self) -> list[str]:
        """Every adapter name in order, with repetitions."""
        return [n for c in self.children for n in ([c] if isinstance(c, str) else c.leaves())]

    @property
    def parallel_channels(self) -> int:
        return max([1] + [c.parallel_channels for c in self.children if not isinstance(c, str)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "children": [
                {"type": "single", "children": [c]} if isinstance(c, str) else c.to_dict() for c in self
            ],
            "kwargs": self._kwargs(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        kind = data.get("type")
        if kind == "single":
            return data["children"][0]
        block = BLOCKS.get(kind)
        if block is None:
            raise ConfigError(f"unknown composition block {kind!r}; valid: {sorted(BLOCKS)}")
        children = [AdapterCompositionBlock.from_dict(c) for c in data.get("children", [])]
        return block(*children, **data.get("kwargs", {}))


class Stack(AdapterCompositionBlock):
    """Children one after another: each reads what the previous one produced (MAD-X).

    A Stack also equals the list or tuple of its children, as a list of names means a Stack.
    """

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            return list(self.children) == list(other)
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(tuple(self.children))


class Sum(AdapterCompositionBlock):
    """PEFT's several active adapters: each update is computed from the same input and they add up.

    For LoRA ``y = W x + Σ_i s_i B_i A_i x`` (``Stack`` chains them instead); for (IA)^3 the scaling
    vectors multiply, as in PEFT. Children are adapter names of LoRA-like methods.
    """


class Fuse(AdapterCompositionBlock):
    """AdapterFusion: an attention over the children's outputs, learned per layer (Pfeiffer et al., 2021)."""

    def __init__(self, *children: Any, name: str | None = None) -> None:
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        return ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def _options(self) -> tuple:
        return (self.name,)


class Split(AdapterCompositionBlock):
    """Sequence segments: child ``i`` takes ``splits[i]`` consecutive positions; they must add up."""

    def __init__(self, *children: Any, splits: int | Sequence[int]) -> None:
        super().__init__(*children)
        self.splits = _sizes(splits, len(self.children), "Split", "splits")

    def _options(self) -> tuple:
        return tuple(self.splits)

    def _kwargs(self) -> dict[str, Any]:
        return {"splits": list(self.splits)}


class BatchSplit(AdapterCompositionBlock):
    """Rows of the batch: child ``i`` takes ``batch_sizes[i]`` consecutive rows; they must add up."""

    def __init__(self, *children: Any, batch_sizes: int | Sequence[int]) -> None:
        super().__init__(*children)
        self.batch_sizes = _sizes(batch_sizes, len(self.children), "BatchSplit", "batch_sizes")

    def _options(self) -> tuple:
        return tuple(self.batch_sizes)

    def _kwargs(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes)}


class Parallel(AdapterCompositionBlock):
    """Every child on its own copy of the batch: ``B`` rows in, ``N·B`` out, channel-major."""

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


class Average(AdapterCompositionBlock):
    """AdapterHub's output averaging: ``(1/N) Σ_i w_i h_i``, weights normalised to sum 1 by default."""

    def __init__(
        self, *children: Any, weights: Sequence[float] | None = None, normalize_weights: bool = True
    ):
        super().__init__(*children)
        n = len(self.children)
        if weights is None:
            self.weights = [1.0 / n] * n if n else []
        else:
            weights = [float(w) for w in weights]
            if len(weights) != n:
                raise ConfigError(f"Average has {n} children but {len(weights)} weights {weights}")
            if not all(math.isfinite(w) for w in weights):
                raise ConfigError(f"Average weights must be finite numbers, got {weights}")
            if normalize_weights:
                total = sum(weights)
                if total == 0:
                    raise ConfigError(f"Average weights {weights} sum to 0 and cannot be normalised")
                weights = [w / total for w in weights]
            self.weights = weights

    def _options(self) -> tuple:
        return tuple(self.weights)

    def _kwargs(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "normalize_weights": False}


BLOCKS: dict[str, type[AdapterCompositionBlock]] = {
    b.__name__: b for b in (Stack, Sum, Fuse, Split, BatchSplit, Parallel, Average)
}

# AdapterHub 1.3's ALLOWED_NESTINGS (MultiTask aside); Sum, fxadapt's, nests nothing
ALLOWED_NESTINGS: dict[type, tuple[type, ...]] = {
    Stack: (str, Fuse, Split, Parallel, BatchSplit, Average),
    Fuse: (str, Stack),
    Split: (str, Split, Stack, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, Split, BatchSplit, Average),
    Average: (str, Stack, Split, BatchSplit),
    Sum: (str,),
}


def setup_names(setup: Any) -> list[str]:
    """The adapter names of an active setup (a name, a block or None), in order."""
    if setup is None:
        return []
    return [setup] if isinstance(setup, str) else setup.flatten()


def _sizes(value: int | Sequence[int], n: int, block: str, option: str) -> list[int]:
    sizes = [value] * n if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise ConfigError(f"{block}.{option} must be an int or a list of ints, got {value!r}")
    sizes = list(sizes)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
        raise ConfigError(f"{block}.{option} must hold ints >= 0, got {sizes}")
    if len(sizes) != n:
        raise ConfigError(f"{block} has {n} children but {option}={sizes} gives {len(sizes)} sizes")
    return sizes


def parse_composition(setup: Any, level: int | None = 0) -> Any:
    """A block from what users pass: a name, a block, or a list (a ``Stack``, as in AdapterHub).

    ``level=None`` parses a block's child (no validation yet); validation happens when the setup
    is activated (``validate_composition``).
    """
    if setup is None:
        return None
    if isinstance(setup, AdapterCompositionBlock):
        if level is not None:
            validate_composition(setup, level)
        return setup
    if isinstance(setup, str):
        if not setup:
            raise ConfigError("an adapter name in a composition must be a non-empty string")
        return setup
    if isinstance(setup, (list, tuple)):
        if level is None:
            return Fuse(*setup)  # AdapterHub: a list nested in a list is a Fuse
        block = Stack(*setup)
        validate_composition(block, level)
        return block
    raise ConfigError(
        f"an adapter setup must be a name, a list of names or a composition block (Stack, Fuse, Split, "
        f"BatchSplit, Parallel, Average, Sum), got {type(setup).__name__} {setup!r}"
    )


def validate_composition(block: AdapterCompositionBlock, level: int = 0) -> None:
    """AdapterHub's nesting rules: which block may hold which, and at most three levels."""
    if not block.children:
        raise ConfigError(f"{type(block).__name__}() has no children: name at least one adapter")
    if level > 1 and not isinstance(block, Stack):
        raise ConfigError(
            f"adapter setup is too deep: {block!r} sits at nesting level {level}, where only a Stack of "
            "adapter names is allowed (AdapterHub's limit)"
        )
    allowed = ALLOWED_NESTINGS[type(block)]
    for child in block.children:
        if not isinstance(child, allowed):
            names = ", ".join("a name" if t is str else t.__name__ for t in allowed)
            raise ConfigError(
                f"{type(block).__name__} cannot contain {type(child).__name__} ({child!r}); "
                f"{type(block).__name__} may contain: {names}"
            )
        if isinstance(child, AdapterCompositionBlock):
            if level >= 1 and isinstance(block, Stack):
                raise ConfigError(
                    f"adapter setup is too deep: the nested {block!r} may hold adapter names only"
                )
            validate_composition(child, level + 1)
    channels = {c.parallel_channels for c in _parallels(block)}
    if len(channels) > 1:
        raise ConfigError(
            f"the Parallel blocks of {block!r} have different numbers of channels {sorted(channels)}"
        )


def _parallels(block: Any) -> list[Parallel]:
    if isinstance(block, str):
        return []
    own = [block] if isinstance(block, Parallel) else []
    return own + [p for c in block.children for p in _parallels(c)]
