"""Foreign module and tensor names onto this model's site keys.

Files made elsewhere (AdapterHub, PEFT, fxadapt on another model class) name modules by their path
in the model that saved them; these helpers find the site of this model that the path means.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from passes.sites import role_hint

from ..errors import AdapterFileError, ConfigError


def match_site(module_path: str, site_keys: list[str]) -> str:
    """The site a foreign module path names: exact, else the one key that ends the same way."""
    if module_path in site_keys:
        return module_path
    hits = [k for k in site_keys if k.endswith("." + module_path) or module_path.endswith("." + k)]
    if len(hits) == 1:
        return hits[0]
    why = "several sites match" if hits else "no site matches"
    raise AdapterFileError(f"cannot map module {module_path!r} onto this model: {why}; see model.sites()")


_CROSS = ("crossattention", "encoder_attn", "EncDecAttention", "cross_attn", "cross_attention")


def site_for(module_path: str, sites: Any) -> str:
    """The site a foreign module path names: by name (``match_site``), else by (stack, layer, role).

    Module names change between versions (transformers 5 renamed ViT's ``encoder.layer.N.attention.
    attention.query`` to ``layers.N.attention.q_proj``); what stays is the layer index, the role the
    graph gives the projection and, in a layer with two attentions, which comes first. The foreign
    name gives the index and a role hint; the site table gives the rest.
    """
    keys = [s.key for s in sites]
    try:
        return match_site(module_path, keys)
    except AdapterFileError as exc:
        error = exc
    parts = module_path.split(".")
    index = next((int(p) for p in parts if p.isdigit()), None)
    role = role_hint(module_path)
    if index is None or role is None:
        raise error
    hits = [s for s in sites if s.layer == index and role in s.roles and s.expert is None]
    stacks = {s.stack for s in hits}
    if len(stacks) > 1:  # an encoder-decoder: the stack whose name the foreign path shares
        words = {w for p in parts[: parts.index(str(index))] for w in p.split("_")}
        named = [s for s in hits if words & set((s.stack or "").replace(".", "_").split("_"))]
        hits = named or hits
    if len({s.key for s in hits}) > 1 and role in ("q", "k", "v", "o"):
        cross = any(p in _CROSS for p in parts)
        hits = hits[1:2] if cross else hits[:1]  # self-attention runs before cross-attention
    if len({s.key for s in hits}) != 1:
        raise error
    return hits[0].key


def split_site_key(key: str, site_keys: Iterable[str]) -> tuple[str, str]:
    """``<site key>.<param path>`` -> (site key, param path), by the longest site key ``key`` starts with."""
    site = max((k for k in site_keys if key.startswith(k + ".")), key=len, default=None)
    if site is None:
        raise ConfigError(f"adapter tensor {key!r} belongs to no site of this model; see model.sites()")
    return site, key[len(site) + 1 :]


def own_key(key: str, site_keys: list[str]) -> str:
    """``<site key>.<param path>`` with the site matched onto this model; the param path may be nested.

    The longest prefix naming a site wins (exactly, else by ``match_site``). A key whose prefix is
    no site (a method's own tensor, such as a bottleneck adapter's ``shared_parameters.*``) is kept
    as it is; the shape check against the built adapter reports it if it does not belong.
    """
    parts = key.split(".")
    known = set(site_keys)
    prefixes = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    for prefix in prefixes:
        if prefix in known:
            return key
    for i, prefix in enumerate(prefixes):
        try:
            return f"{match_site(prefix, site_keys)}.{'.'.join(parts[len(parts) - 1 - i :])}"
        except AdapterFileError:
            continue
    return key
