"""LoRA's and (IA)^3's tensor names in AdapterHub's files, onto fxadapt's sites and back.

AdapterHub names a tensor ``<module>.loras.<adapter>.<lora_A|lora_B>``; fxadapt names it
``<site key>.<param>``. PEFT's names are in ``peft.py``.
"""

from __future__ import annotations

import re
from typing import Any

from ...formats.keys import site_for, split_site_key

_ADAPTERHUB_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>.+)$")
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def lora_key(key: str, sites: Any, config: Any = None) -> str | None:
    """``<module>.loras.<name>.<param>`` -> ``<site>.<param>``: LoRA and (IA)^3 name tensors by module."""
    m = _ADAPTERHUB_KEY.match(key)
    if m is None:
        return None
    return f"{site_for(m['path'], sites)}.{m['param']}"


def lora_name(key: str, sites: Any, config: Any, name: str) -> str:
    """``<site>.<param>`` -> ``<site>.loras.<name>.<param>``, the inverse of ``lora_key``."""
    site, param = split_site_key(key, [s.key for s in sites])
    return f"{site}.loras.{name}.{param}"
