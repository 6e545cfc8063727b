"""Where bottleneck adapters go: the attention-output and FFN-output sites, numbered as AdapterHub does."""

from __future__ import annotations

import dataclasses

from passes.sites import Site, SiteTable


@dataclasses.dataclass(frozen=True)
class Location:
    """A site a bottleneck adapter can take: its kind and AdapterHub's layer index."""

    site: Site
    kind: str  # mh_adapter | cross_adapter | output_adapter
    layer: int


def locations(sites: SiteTable) -> list[Location]:
    """The ``o`` and ``ffn_out`` sites inside layers, in graph order.

    Layers are numbered as AdapterHub does: consecutively over the stacks in graph order (an
    encoder-decoder's decoder layer ``i`` is layer ``n_encoder + i``). In a layer with two ``o``
    sites the second is the cross-attention's (decoder layers run self-attention first).
    """
    sizes: dict[str | None, int] = {}
    for s in sites:
        if s.layer is not None:
            sizes[s.stack] = max(sizes.get(s.stack, 0), s.layer + 1)
    offsets, total = {}, 0
    for stack, size in sizes.items():
        offsets[stack], total = total, total + size
    seen: set[tuple] = set()
    out = []
    for s in sites:
        if s.layer is None:
            continue
        if "o" in s.roles:
            kind = "cross_adapter" if (s.stack, s.layer) in seen else "mh_adapter"
            seen.add((s.stack, s.layer))
        elif "ffn_out" in s.roles:
            kind = "output_adapter"
        else:
            continue
        out.append(Location(s, kind, offsets[s.stack] + s.layer))
    return out
