"""AdapterHub's tensor names for the bottleneck family, both ways, and what its files leave out."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from passes.attention import attention_layers
from passes.bottleneck import INVERTIBLE, SHARED

from ...errors import AdapterFileError
from ...formats.keys import match_site, split_site_key
from .build import build
from .sites import locations

_SHARED_KEY = re.compile(r"^(?:.*\.)?shared_parameters\.(?P<name>[^.]+)\.(?P<param>.+)$")
_INV_KEY = re.compile(r"^(?:.*\.)?invertible_adapters\.(?P<name>[^.]+)\.(?P<param>.+)$")
_LAYER_KEY = re.compile(r"^(?P<path>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)$")


def adapterhub_key(key: str, sites: Any, config: Any = None) -> str | None:
    """AdapterHub's bottleneck tensor names onto fxadapt's ``<site key>.<param>``.

    ``<stack>.<i>.<block>.adapters.<name>.<param>`` names layer ``i``'s adapter; ``<block>`` says
    which one (``attention.output``/``attention_adapters``: the attention block, ``cross...``: the
    cross-attention block, otherwise the FFN). ``shared_parameters.<name>.*`` and
    ``invertible_adapters.<name>.*`` map to the pseudo-sites of the same names.
    """
    for pattern, site in ((_SHARED_KEY, SHARED), (_INV_KEY, INVERTIBLE)):
        m = pattern.match(key)
        if m:
            return f"{site}.{m['param']}"
    m = _LAYER_KEY.match(key)
    if m is None:
        return None
    parts = m["path"].split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if idx is None:
        return None
    stack, layer, block = ".".join(parts[:idx]), int(parts[idx]), ".".join(parts[idx + 1 :])
    kind = "output_adapter"
    if "cross" in block:
        kind = "cross_adapter"
    elif "attention" in block or "attn" in block:
        kind = "mh_adapter"
    same = [loc for loc in locations(sites) if loc.kind == kind and loc.site.layer == layer]
    hits = [loc.site.key for loc in same if _same_stack(loc.site.stack or "", stack)]
    if not hits and len({loc.site.stack for loc in same}) == 1:  # names are hints: one stack, renamed
        hits = [loc.site.key for loc in same]
    if len(hits) != 1:
        # names only as a hint: fall back to the module path, for models laid out unusually
        try:
            hits = [match_site(m["path"], [s.key for s in sites])]
        except AdapterFileError:
            return None
    param = m["param"]
    if param.startswith("adapter_norm_before."):  # AdapterHub registers the input norm twice
        param = "adapter_down.0." + param.split(".", 1)[1]
    return f"{hits[0]}.{param}"


def _same_stack(ours: str, theirs: str) -> bool:
    return ours == theirs or ours.endswith("." + theirs) or theirs.endswith("." + ours)


# AdapterHub's layer attribute for each kind, in models whose layers hold the adapters themselves
_LAYER_ATTRIBUTES = {
    "mh_adapter": "attention_adapters",
    "cross_adapter": "cross_attention_adapters",
    "output_adapter": "output_adapters",
}


def adapterhub_name(key: str, sites: Any, config: Any, name: str) -> list[str]:
    """fxadapt's ``<site key>.<param>`` -> AdapterHub's names, the inverse of ``adapterhub_key``.

    AdapterHub keeps a layer's adapter in the module that ends the block, where the model has one
    (BERT's ``attention.output`` / ``output``, the parent of the ``o`` / ``ffn_out`` projection), and
    otherwise in an attribute of the layer (``h.0.attention_adapters``, ``output_adapters``,
    ``cross_attention_adapters``). An input layer norm (``ln_before``) is registered twice there,
    also as ``adapter_norm_before``. The invertible adapter is AdapterHub's base model's, or its
    encoder's in an encoder-decoder model; the shared PHM parameters are the base model's.
    """
    if key.startswith(SHARED + "."):
        return [f"{SHARED}.{name}.{key[len(SHARED) + 1 :]}"]
    if key.startswith(INVERTIBLE + "."):
        return [f"{_invertible_home(sites)}{INVERTIBLE}.{name}.{key[len(INVERTIBLE) + 1 :]}"]
    by_key = {loc.site.key: loc for loc in locations(sites)}
    site_key, param = split_site_key(key, by_key)
    block = block_path(site_key, sites)
    names = [f"{block}.adapters.{name}.{param}"]
    if config.ln_before and param.startswith("adapter_down.0."):
        names.append(f"{block}.adapters.{name}.adapter_norm_before.{param.split('.', 2)[2]}")
    return names


def block_path(site_key: str, sites: Any) -> str:
    """The module AdapterHub keeps a residual site's bottleneck layer (adapters, fusions) in.

    The module that ends the block, where the model has one (BERT's ``attention.output`` /
    ``output``, the parent of the ``o`` / ``ffn_out`` projection), else an attribute of the layer
    (``h.0.attention_adapters``, ``output_adapters``, ``cross_attention_adapters``).
    """
    loc = {loc.site.key: loc for loc in locations(sites)}[site_key]
    parent = site_key.rsplit(".", 1)[0]
    layer_path = f"{loc.site.stack}.{loc.site.layer}"
    if parent != layer_path and parent.rsplit(".", 1)[-1] == "output":
        return parent
    return f"{layer_path}.{_LAYER_ATTRIBUTES[loc.kind]}"


def _invertible_home(sites: Any) -> str:
    """``""``, or the encoder's module path plus ``.`` where AdapterHub keeps it (encoder-decoder models)."""
    encoder = next((layer for layer in attention_layers(sites) if layer.location == "encoder"), None)
    if encoder is None:
        return ""
    stack = {s.key: s for s in sites}[encoder.key].stack or ""
    return stack.rsplit(".", 1)[0] + "." if "." in stack else ""


def fill_unsaved_shared(config: Any, tensors: dict[str, torch.Tensor], sites: Any) -> Any:
    """Initialise the shared parameters AdapterHub did not write, as AdapterHub does when loading.

    AdapterHub 1.3 saves and loads only tensors whose name contains ``.shared_parameters.<name>.``
    (with a leading dot), so the Compacter rules shared by all layers of a bare base model
    (``shared_parameters.<name>.phm_rule``) are neither written nor read: its ``load_adapter``
    leaves them at a fresh initialisation. fxadapt does the same, and says so.
    """
    if not getattr(config, "phm_layer", False) or any(k.startswith(SHARED + ".") for k in tensors):
        return config
    shared = build(config, sites, torch.float32, torch.device("cpu")).get(SHARED)
    if shared is None:
        return config
    for k, v in shared.state_dict().items():
        tensors[f"{SHARED}.{k}"] = v
    warnings.warn(
        f"the adapter's shared parameters ({', '.join(shared.state_dict())}) are not in the AdapterHub file "
        "(AdapterHub does not save them for a base model without a head); they are freshly initialised, "
        "as AdapterHub's load_adapter would do, so outputs differ from the saving model's",
        stacklevel=4,
    )
    return config
