"""From an active setup to what each pass inserts: one plan tree per site, grouped by pass.

A setup (``"a"``, ``Stack("a", "b")``, ``Parallel(...)``) names adapters; an adapter is one or more
methods' modules at their sites (a union has several). For every pass the setup touches, each of its
sites gets the setup *projected* onto the adapters that have a module there: names without one drop
out, as in AdapterHub ("names not present in the layer are skipped"), blocks left with one child
collapse, row and sequence splits keep an empty slot so that their rows pass through unchanged.
Per-row routing (``Route``) projects like a row split; AdapterDrop either leaves the skipped layers'
sites out, or wraps each layered site's plan in a ``drop`` plan that the pass applies per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from passes.compose import Leaf, Plan

from ..errors import ConfigError
from .blocks import AdapterCompositionBlock, Average, BatchSplit, Fuse, Parallel, Split, Stack, Sum
from .drop import Drop
from .route import Route

_KIND = {
    Stack: "stack",
    Sum: "sum",
    Average: "average",
    BatchSplit: "rows",
    Parallel: "rows",
    Split: "split",
    Fuse: "fuse",
    Route: "route",
}
_BLOCK_NAME = {v: k.__name__ for k, v in _KIND.items() if k is not Parallel}
_BLOCK_NAME.update(route="per-row routing (adapter_names=)", drop="AdapterDrop (skip_layers)")


@dataclass
class PassPlan:
    """What one pass inserts: its function, the methods that use it, ``{site key: plan or target}``."""

    insert: Callable
    methods: list[Any] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Member:
    """One adapter's modules for one pass: ``{site key: module target}`` and its global modules."""

    name: str
    method: Any
    targets: dict[str, str]
    extra: tuple[tuple[str, str], ...] = ()


def normalize(setup: Any) -> Any:
    """``Stack("a")`` and ``"a"`` are the same setup; a Stack of one collapses to its child."""
    if isinstance(setup, Stack) and len(setup) == 1:
        return normalize(setup[0])
    return setup


def plan(
    setup: Any,
    adapters: Any,
    fusion_target: Callable[[str, str], str | None],
    drop: Drop | None = None,
    select: Callable[[Any, dict[str, str]], dict[str, str]] | None = None,
) -> list[PassPlan]:
    """The passes a setup needs, in the order their adapters first appear, each with its site plans.

    ``fusion_target(fusion name, site key)`` gives the fusion module at a site and its options
    (``None`` if none); ``drop``: AdapterDrop's skipped layers. A pass whose methods all take
    ``drop`` plans gets one around each layered site's plan (it skips per layer, also inside a
    prefix's location); for the others, the sites of skipped layers are left out here.
    ``select(method, targets)`` keeps the part of an adapter a graph runs (generation's decode graph).
    """
    setup = normalize(setup)
    if setup is None:
        return []
    names = [setup] if isinstance(setup, str) else setup.flatten()
    passes: dict[Any, PassPlan] = {}
    members: dict[Any, dict[str, _Member]] = {}
    for name in names:
        adapter = adapters[name]
        uses: dict[Any, int] = {}
        for method, _, keys in adapter.parts():
            targets = {k: adapter.target(own) for k, own in keys.items()}
            if select is not None:
                targets = select(method, targets)
                if not targets:
                    continue
            # a union's parts that share a pass (LoRA and (IA)^3) run as successive passes, in order
            uses[method.insert] = uses.get(method.insert, -1) + 1
            insert = (method.insert, uses[method.insert])
            group = passes.setdefault(insert, PassPlan(method.insert))
            if method not in group.methods:
                group.methods.append(method)
            global_keys = set(getattr(method, "global_keys", ()) or ())
            extra = tuple((k, t) for k, t in targets.items() if k in global_keys)
            members.setdefault(insert, {})[name] = _Member(name, method, targets, extra)
    for insert, group in passes.items():
        by_name = members[insert]
        global_keys = {k for m in by_name.values() for k, _ in m.extra}
        keys: list[str] = []
        for member in by_name.values():
            keys += [k for k in member.targets if k not in keys and k not in global_keys]
        for key in global_keys:
            leaves = [Leaf(m.targets[key]) for m in by_name.values() if key in m.targets]
            group.targets[key] = leaves[0] if len(leaves) == 1 else Plan("stack", tuple(leaves))
        wraps = drop is not None and drop.active and all("drop" in m.compose for m in group.methods)
        for key in keys:
            if drop is not None and not wraps and drop.skips(key):
                continue
            tree = _project(setup, key, by_name, fusion_target)
            if tree is not None:
                _check_supported(tree, group, key, by_name)
                if wraps and drop.layer_of.get(key) is not None:
                    tree = Plan("drop", (tree,), sizes=tuple(sorted(drop.layers)))
                group.targets[key] = tree
    return [g for g in passes.values() if g.targets]


def _project(block: Any, key: str, members: dict[str, _Member], fusion_target: Callable) -> Any:
    if isinstance(block, str):
        member = members.get(block)
        if member is None or key not in member.targets:
            return None
        return Leaf(member.targets[key], member.extra)
    kind = _KIND[type(block)]
    children = [_project(c, key, members, fusion_target) for c in block.children]
    if kind in ("rows", "split", "route"):
        if all(c is None for c in children):
            return None
        sizes = None
        if isinstance(block, BatchSplit):
            sizes = tuple(block.batch_sizes)
        elif isinstance(block, Split):
            sizes = tuple(block.splits)
        return Plan(kind, tuple(children), sizes=sizes)
    present = [(c, w) for c, w in zip(children, _weights(block)) if c is not None]
    if not present:
        return None
    if kind == "fuse":
        if len(present) != len(children):
            missing = [n for n, c in zip(block.children, children) if c is None]
            kinds = sorted({members[n].method.name for n in block.flatten() if n in members})
            raise ConfigError(
                f"Fuse{tuple(block.flatten())} at {key!r} ({', '.join(kinds)}): {missing} have no adapter "
                "there; AdapterFusion fuses bottleneck adapters that sit at the same places (as AdapterHub "
                "requires)"
            )
        found = fusion_target(block.name, key)
        if found is None:
            raise ConfigError(
                f"no fusion layer {block.name!r} at {key!r}: add_adapter_fusion(Fuse{tuple(block.flatten())}) "
                "or load_adapter_fusion() first"
            )
        target, options = found
        return Plan("fuse", tuple(c for c, _ in present), target=target, options=options)
    if len(present) == 1 and kind in ("stack", "sum"):
        return present[0][0]
    weights = tuple(w for _, w in present) if kind == "average" else None
    return Plan(kind, tuple(c for c, _ in present), weights=weights)


def _weights(block: AdapterCompositionBlock) -> list[float | None]:
    return list(block.weights) if isinstance(block, Average) else [None] * len(block.children)


def _check_supported(tree: Any, group: PassPlan, key: str, members: dict[str, _Member]) -> None:
    """Refuse a block the pass's methods cannot compose, naming the method and what it can do."""
    if isinstance(tree, Leaf) or tree is None:
        return
    for method in group.methods:
        supported = set(getattr(method, "compose", ()) or ())
        used = {member.method for member in members.values()}
        if method in used and tree.kind not in supported:
            names = [_BLOCK_NAME.get(k, k) for k in supported] + (["Parallel"] if "rows" in supported else [])
            valid = ", ".join(sorted(names)) or "none"
            block = "BatchSplit/Parallel" if tree.kind == "rows" else _BLOCK_NAME[tree.kind]
            raise ConfigError(
                f"{method.name} adapters cannot be composed with {block} (at {key!r}); blocks they "
                f"support: {valid}"
            )
    for child in tree.children:
        _check_supported(child, group, key, members)


def check_setup(setup: Any, adapters: Any, merged: tuple[str, ...]) -> None:
    """Refuse unknown names, repeated ones where they would apply twice, and merged adapters in blocks."""
    setup = normalize(setup)
    if setup is None:
        return
    names = [setup] if isinstance(setup, str) else setup.leaves()
    unknown = [n for n in dict.fromkeys(names) if n not in adapters]
    if unknown:
        raise ConfigError(f"no adapter named {unknown}; adapters: {list(adapters)}")
    if isinstance(setup, AdapterCompositionBlock):
        _check_repeats(setup)
        in_blocks = [n for n in merged if n in names]
        if in_blocks and not (isinstance(setup, Sum) and all(isinstance(c, str) for c in setup)):
            raise ConfigError(
                f"adapter(s) {in_blocks} are merged into the base weights, so a block cannot treat them "
                f"apart from the base model: reset_adapter() first (a merged adapter may be active alone, "
                "or in a Sum)"
            )


def _check_repeats(block: AdapterCompositionBlock) -> None:
    """A name twice in one Stack, Sum, Average or Fuse would apply twice: refuse it."""
    if isinstance(block, (Stack, Sum, Average, Fuse)):
        seen: list[str] = []
        for child in block.children:
            for name in [child] if isinstance(child, str) else child.leaves():
                if name in seen:
                    raise ConfigError(
                        f"adapter {name!r} appears twice in {block!r}, so it would apply twice; name each "
                        "adapter once (several copies need add_adapter under other names)"
                    )
                seen.append(name)
    for child in block.children:
        if isinstance(child, AdapterCompositionBlock):
            _check_repeats(child)


def check_call(setup: Any, tensors: dict[str, Any]) -> None:
    """Refuse a call whose batch or sequence does not add up to a block's ``batch_sizes`` or ``splits``."""
    ref = next((t for k, t in tensors.items() if k in ("input_ids", "inputs_embeds")), None)
    ref = ref if ref is not None else next(iter(tensors.values()), None)
    if ref is None or ref.dim() == 0:
        return
    _check_rows(setup, int(ref.shape[0]))
    if ref.dim() >= 2:
        _check_positions(setup, int(ref.shape[1]))


def _check_rows(block: Any, rows: int) -> None:
    if isinstance(block, str):
        return
    if isinstance(block, BatchSplit):
        if sum(block.batch_sizes) != rows:
            raise ConfigError(
                f"{block!r}: batch_sizes add up to {sum(block.batch_sizes)} but the batch has {rows} rows; "
                "they must add up to the batch size"
            )
        for child, size in zip(block.children, block.batch_sizes):
            _check_rows(child, size)
        return
    for child in block.children:
        _check_rows(child, rows)


def _check_positions(block: Any, length: int) -> None:
    if isinstance(block, str):
        return
    if isinstance(block, Split):
        if sum(block.splits) != length:
            raise ConfigError(
                f"{block!r}: splits add up to {sum(block.splits)} but the sequence has {length} positions; "
                "they must add up to the sequence length"
            )
        for child, size in zip(block.children, block.splits):
            _check_positions(child, size)
        return
    for child in block.children:
        _check_positions(child, length)
