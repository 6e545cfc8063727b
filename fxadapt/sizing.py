"""Building an adapter's modules for a model: the config checked where it is used, its size before allocation.

A config can be changed after it is made, or come from a file: ``build_modules`` checks it again,
then builds the modules once on the meta device (no memory) and refuses an adapter far larger than
the model before anything real is allocated (a file with ``"r": 10**11`` must not exhaust memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import ConfigError
from .registry import method_of

# An adapter may hold at most this many times the base model's parameters (and always 2**24):
# more is a mistake, or a malformed file, and would exhaust memory before failing.
SIZE_FACTOR = 4
MIN_LIMIT = 2**24


def build_modules(config: AdapterConfig, sites: Any, base: nn.Module) -> dict[str, nn.Module]:
    """``{site key: module}`` of ``config`` on ``base``'s sites, in its dtype and on its device."""
    config.verify()
    method = method_of(config)
    ref = next((p for p in base.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    size = _dry_run_size(method, config, sites, dtype)
    limit = max(SIZE_FACTOR * sum(p.numel() for p in base.parameters()), MIN_LIMIT)
    if size is not None and size > limit:
        raise ConfigError(
            f"this {method.name} adapter would hold {size:,} values, more than {SIZE_FACTOR}x the base "
            f"model's parameters (limit {limit:,}): check its sizes (r, prefix_length, bottleneck_size, "
            "reduction_factor, ...) against the model"
        )
    return method.build(config, sites, dtype, device)


def _dry_run_size(method: Any, config: AdapterConfig, sites: Any, dtype: torch.dtype) -> int | None:
    """The number of values the modules hold, from a build on the meta device; None if it cannot run there."""
    meta = torch.device("meta")
    try:
        with meta:  # also tensors made without a device argument (index buffers) stay on meta
            modules = method.build(config, sites, dtype, meta)
    except ConfigError:
        raise
    except Exception:  # an op without a meta kernel: the real build checks what it checks
        return None
    return sum(t.numel() for m in modules.values() for t in (*m.parameters(), *m.buffers()))
