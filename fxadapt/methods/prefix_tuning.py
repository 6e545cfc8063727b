"""Prefix tuning: trained keys and values before the real ones at every attention op (Li & Liang, 2021).

As in AdapterHub, the prefix of one location (``self``, ``encoder`` or ``cross``) is computed for all
of its layers at once. Reparameterized (``flat=False``): an embedding ``wte`` ``[P, hidden]`` through an
MLP ``Linear(hidden, bottleneck) -> non_linearity -> Linear(bottleneck, layers·2·W)``; flat: the
``P·layers·2·W`` values themselves. ``W`` is the key width (kv heads × head dim: grouped-query models
get fewer prefix values). Row ``(p, 2l)`` is layer ``l``'s key at prefix position ``p``, ``(p, 2l+1)`` its
value, the layout AdapterHub's ``view(B, P, 2·layers, heads, head_dim)`` reads.

fxadapt keeps one module per location, keyed by the location's first k projection site (AdapterHub
stores the same pool under every layer and once at the top; all copies map onto that key), with
AdapterHub's parameter names: ``wte.weight``, ``control_trans.{0,2}.{weight,bias}``, or
``control_trans`` when flat; ``gates.<i>.{weight,bias}`` per layer with ``use_gating``. ``eject``
turns a reparameterized prefix into a flat one with the same outputs.

In composition blocks (``COMPOSE``), a ``Stack`` concatenates prefixes and ``BatchSplit``/``Parallel``
give each block of rows its own, padded and masked to the longest (docs/composition.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from passes.attention import AttentionLayer, attention_layers
from passes.prefix import insert_prefix
from passes.sites import SiteTable

from ..adapter import Adapter
from ..config import AdapterConfig, check
from ..errors import AdapterFileError, ConfigError
from ..registry import Method, register

LOCATIONS = ("self", "encoder", "cross")
# a Stack concatenates prefixes, row blocks and per-row routing give each row its own (padded and
# masked), AdapterDrop's skipped layers get none; an average, fusion or sequence split of extra keys
# and values has no meaning (AdapterHub fails there too)
COMPOSE = frozenset({"stack", "rows", "route", "drop"})
POSITIONS = ("none", "before_tokens")
NON_LINEARITIES = tuple(sorted(set(ACT2FN) | {"leakyrelu"}))


@dataclasses.dataclass
class PrefixTuningConfig(AdapterConfig):
    """AdapterHub's ``PrefixTuningConfig``: names and defaults."""

    architecture = "prefix_tuning"
    foreign_defaults = {"init_weights_seed": None}
    # "none": AdapterHub's, the prefix has no position; "before_tokens": PEFT's, the prefix takes
    # positions 0..P-1 (a cache) and the real tokens P..P+S-1
    local_options = {"positions": "none"}

    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: list[int] = dataclasses.field(default_factory=list)
    flat: bool = False
    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    use_gating: bool = False
    shared_gating: bool = True
    positions: str = "none"

    def validate(self) -> None:
        name = type(self).__name__
        check(
            self.positions in POSITIONS,
            f"{name}.positions must be one of {list(POSITIONS)}, got {self.positions!r}",
        )
        for flag in ("encoder_prefix", "cross_prefix", "flat", "use_gating", "shared_gating"):
            value = getattr(self, flag)
            check(isinstance(value, bool), f"{name}.{flag} must be True or False, got {value!r}")
        for size in ("prefix_length", "bottleneck_size"):
            value = getattr(self, size)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name}.{size} must be an int >= 1, got {value!r}",
            )
        check(
            isinstance(self.non_linearity, str) and self.non_linearity.lower() in NON_LINEARITIES,
            f"{name}.non_linearity {self.non_linearity!r} is not valid; valid: {list(NON_LINEARITIES)}",
        )
        check(
            isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
            f"{name}.dropout must be in [0, 1), got {self.dropout!r}",
        )
        check(
            isinstance(self.leave_out, (list, tuple)) and all(isinstance(i, int) for i in self.leave_out),
            f"{name}.leave_out must list layer ints, got {self.leave_out!r}",
        )


@dataclasses.dataclass
class PrefixTuningFlatConfig(PrefixTuningConfig):
    """``"prefix_tuning_flat"``: the prefix values are the parameters (no MLP)."""

    flat: bool = True

    def validate(self) -> None:
        super().validate()
        check(self.flat, "PrefixTuningFlatConfig.flat must be True; use PrefixTuningConfig for flat=False")


def _activation(name: str) -> nn.Module:
    """AdapterHub's activation names: ``transformers``' ones plus ``leakyrelu``."""
    name = name.lower()
    return nn.LeakyReLU() if name == "leakyrelu" else ACT2FN[name]


class PrefixTuning(nn.Module):
    """The prefix of one location: ``prefixes(ref)`` for all its layers, ``forward`` for one layer."""

    def __init__(
        self,
        config: PrefixTuningConfig,
        location: str,
        slots: tuple[int | None, ...],
        width: int,
        hidden: int,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.location = location
        self.slots = tuple(slots)  # position of each layer of the location -> its prefix, or None
        self.n_layers = sum(s is not None for s in slots)
        self.prefix_length = config.prefix_length
        self.width = width
        self.hidden = hidden
        self.flat = config.flat
        self.non_linearity = config.non_linearity.lower()
        out = self.n_layers * 2 * width
        if self.flat:
            self.control_trans = nn.Parameter(torch.randn(config.prefix_length * out, **kw))
        else:
            self.wte = nn.Embedding(config.prefix_length, hidden, **kw)
            self.control_trans = nn.Sequential(
                nn.Linear(hidden, config.bottleneck_size, **kw),
                _activation(self.non_linearity),
                nn.Linear(config.bottleneck_size, out, **kw),
            )
        self.gates = nn.ModuleDict()
        if config.use_gating:
            for i, slot in enumerate(slots):
                if slot is not None:
                    gate = nn.Linear(hidden, 1 if config.shared_gating else 2, **kw)
                    with torch.no_grad():
                        gate.weight.normal_(mean=0.0, std=0.02)
                    self.gates[str(i)] = gate
        self.dropout = nn.Dropout(config.dropout)

    def values(self) -> torch.Tensor:
        """The prefix keys and values of every layer, ``[P, 2·layers, W]`` (no dropout)."""
        if self.flat:
            kv = self.control_trans
        else:
            kv = self.control_trans(self.wte.weight)
        return kv.reshape(self.prefix_length, 2 * self.n_layers, self.width)

    def prefixes(self, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's keys and values, ``[B, P, W]`` (``2·layers`` of them), for a batch the size of
        ``ref``'s first dim, dropout applied.

        The layers are split off before the batch is expanded: slicing one ``[B, P, 2·layers, W]`` tensor
        per layer made every slice's backward fill a zero tensor of that whole size (issue 13: 0.4 s of
        ``fill_`` a BERT-base step); split first, the backward stacks ``[P, W]`` gradients once."""
        batch = ref.shape[0]
        parts = self.values().unbind(1)
        parts = tuple(part.unsqueeze(0).expand(batch, -1, -1) for part in parts)
        if self.dropout.p > 0:
            parts = tuple(self.dropout(part) for part in parts)
        return parts

    def forward(
        self, kv: tuple[torch.Tensor, ...], x: torch.Tensor, position: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys and values ``[B, P, W]`` of the layer at ``position``; ``None`` where it is left out."""
        slot = self.slots[position]
        if slot is None:
            return None, None
        pk, pv = kv[2 * slot], kv[2 * slot + 1]
        if str(position) in self.gates:
            hidden = x.reshape(pk.shape[0], -1, x.shape[-1])
            gate = torch.sigmoid(self.gates[str(position)](hidden)).mean(dim=1)
            pk = pk * gate[:, 0].view(-1, 1, 1)
            pv = pv * gate[:, -1].view(-1, 1, 1)
        return pk, pv

    def extra_repr(self) -> str:
        kind = "flat" if self.flat else f"reparameterized, {self.non_linearity}"
        return f"{self.location}: {self.n_layers} layers, length {self.prefix_length}, width {self.width}, {kind}"


def locations(config: PrefixTuningConfig, sites: SiteTable) -> dict[str, list[AttentionLayer]]:
    """The attention layers of each location this config adds a prefix to (left-out layers included)."""
    groups: dict[str, list[AttentionLayer]] = {}
    for layer in attention_layers(sites):
        groups.setdefault(layer.location, []).append(layer)
    wanted = {"self": True, "encoder": config.encoder_prefix, "cross": config.cross_prefix}
    return {loc: layers for loc, layers in groups.items() if wanted[loc]}


def build(
    config: PrefixTuningConfig, sites: SiteTable, dtype: torch.dtype, device: Any
) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {}
    for location, layers in locations(config, sites).items():
        slots, n = [], 0
        for layer in layers:
            slots.append(None if layer.layer in config.leave_out else n)
            n += layer.layer not in config.leave_out
        if n == 0:
            continue
        widths = {layer.width for layer in layers}
        check(len(widths) == 1, f"prefix tuning needs one key width per location; {location} has {widths}")
        modules[layers[0].key] = PrefixTuning(
            config, location, tuple(slots), widths.pop(), layers[0].hidden, dtype, device
        )
    check(
        bool(modules),
        "prefix tuning found no attention layer to attach to: check leave_out and model.sites()",
    )
    return modules


def eject(adapter: Adapter) -> Adapter:
    """A ``prefix_tuning_flat`` adapter whose parameters are this adapter's computed prefixes."""
    if not isinstance(adapter.config, PrefixTuningConfig):
        raise ConfigError(f"adapter {adapter.name!r} is {adapter.method.name}, not prefix tuning")
    config = PrefixTuningFlatConfig(**{**dataclasses.asdict(adapter.config), "flat": True})
    modules = {}
    for key, module in adapter.items():
        ref = next(module.parameters())
        slots = module.slots
        flat = PrefixTuning(
            config, module.location, slots, module.width, module.hidden, ref.dtype, ref.device
        )
        with torch.no_grad():
            flat.control_trans.copy_(module.values().reshape(-1))
            flat.gates.load_state_dict(module.gates.state_dict())
        flat.train(module.training)
        flat.requires_grad_(any(p.requires_grad for p in module.parameters()))
        modules[key] = flat
    return Adapter(adapter.name, config, modules)


# ---- AdapterHub names ------------------------------------------------------------------------------
_POOL = re.compile(
    r"^(?:.+\.prefix_tuning\.pool|(?:.+\.)?prefix_tuning)\.prefix_tunings\.[^.]+\."
    r"(?:[^.]+_)?(?P<loc>self|encoder|cross)(?:_prefix)?\.(?P<param>.+)$"
)
_GATE = re.compile(r"^(?P<path>.+)\.prefix_tuning\.prefix_gates\.[^.]+\.(?P<param>weight|bias)$")
_PARAMS = {"wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight"}
_PARAMS |= {"control_trans.2.bias", "control_trans"}


def adapterhub_key(key: str, sites: Any, config: Any = None) -> str | None:
    """AdapterHub's pool (stored under every layer and once at the top) -> ``<first k site>.<param>``."""
    layers = attention_layers(sites)
    m = _POOL.match(key)
    if m is not None and m["param"] in _PARAMS:
        first = next((layer for layer in layers if layer.location == m["loc"]), None)
        if first is None:
            raise AdapterFileError(f"the model has no {m['loc']!r} attention for AdapterHub tensor {key!r}")
        return f"{first.key}.{m['param']}"
    m = _GATE.match(key)
    if m is not None:
        layer = _layer_under(m["path"], layers)
        if layer is None:
            return None
        first = next(f for f in layers if f.location == layer.location)
        return f"{first.key}.gates.{layer.position}.{m['param']}"
    return None


_TOP = re.compile(r"^(?:(?P<root>.+)\.)?prefix_tuning\.prefix_tunings\.(?P<name>[^.]+)\.(?P<rest>.+)$")


def adapterhub_prepare(tensors: dict[str, torch.Tensor], sites: Any) -> dict[str, torch.Tensor]:
    """One pool per part in a model made of two AdapterHub models, as one pool of this model.

    AdapterHub's EncoderDecoderModel is a BERT encoder and a BERT decoder, each with its own pool
    (``encoder.prefix_tuning...`` and ``decoder.bert.prefix_tuning...``), and the encoder's
    self-attention prefix is its part's ``self_prefix``: it becomes ``encoder_prefix`` (what a BART
    pool calls it), and the per-layer copies of the parts' pools are left out.
    """
    roots = {m["root"] for key in tensors if (m := _TOP.match(key))}
    if len(roots) < 2:
        return tensors
    layers = attention_layers(sites)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        m = _TOP.match(key)
        if m is None:
            if ".prefix_tuning.pool." not in key:  # a gate: mapped by its attention's path
                out[key] = tensor
            continue
        under = [la for la in layers if la.key.startswith(f"{m['root']}.")] if m["root"] else []
        rest = m["rest"]
        if under and all(la.location == "encoder" for la in under) and rest.startswith("self_prefix."):
            rest = "encoder_prefix." + rest[len("self_prefix.") :]
        out[f"prefix_tuning.prefix_tunings.{m['name']}.{rest}"] = tensor
    return out


def adapterhub_name(key: str, sites: Any, config: Any, name: str) -> list[str]:
    """fxadapt's ``<first k site>.<param>`` -> AdapterHub's names, the inverse of ``adapterhub_key``.

    AdapterHub's pool lives in its base model (``prefix_tuning.prefix_tunings.<name>.<loc>_prefix``)
    and, as every attention's ``PrefixTuningLayer`` holds it, under each attention module too
    (``<attention>.prefix_tuning.pool.prefix_tunings...``, left-out layers included), so a pool
    tensor has one name per attention layer plus one. A gate belongs to one attention layer:
    ``<attention>.prefix_tuning.prefix_gates.<name>.<param>``.
    """
    layers = attention_layers(sites)
    firsts = {}
    for layer in layers:
        firsts.setdefault(layer.location, layer)
    first = next((f for f in firsts.values() if key.startswith(f.key + ".")), None)
    if first is None:
        raise ConfigError(f"prefix tuning tensor {key!r} belongs to no attention of this model")
    param = key[len(first.key) + 1 :]
    if param.startswith("gates."):
        _, position, rest = param.split(".", 2)
        layer = [la for la in layers if la.location == first.location][int(position)]
        return [f"{_attention_module(layer)}.prefix_tuning.prefix_gates.{name}.{rest}"]
    pool = f"prefix_tunings.{name}.{first.location}_prefix.{param}"
    return [f"prefix_tuning.{pool}"] + [f"{_attention_module(la)}.prefix_tuning.pool.{pool}" for la in layers]


def _attention_module(layer: AttentionLayer) -> str:
    """The attention module (AdapterHub's home of its ``prefix_tuning``): its k projection's parent."""
    return layer.key.rsplit(".", 1)[0]


def _layer_under(path: str, layers: list[AttentionLayer]) -> AttentionLayer | None:
    """The attention layer whose k projection sits under module ``path`` (leading names may differ)."""
    parts = path.split(".")
    for i in range(len(parts)):
        tail = ".".join(parts[i:])
        hits = [layer for layer in layers if ("." + layer.key).find("." + tail + ".") >= 0]
        if len(hits) == 1:
            return hits[0]
        if hits:
            return None
    return None


def call_inputs(adapter: Adapter, kwargs: dict[str, Any], base: nn.Module) -> dict[str, Any]:
    """``positions="before_tokens"``: the real tokens are numbered after the prefix, as after a cache."""
    if adapter.config.positions != "before_tokens" or kwargs.get("position_ids") is not None:
        return kwargs
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise ConfigError(
            f"prefix {adapter.name!r} has positions='before_tokens', but {type(base).__name__} takes no "
            "position_ids to number the tokens after the prefix"
        )
    ref = kwargs.get("input_ids")
    ref = ref if isinstance(ref, torch.Tensor) else kwargs.get("inputs_embeds")
    if not isinstance(ref, torch.Tensor):
        raise ConfigError("prefix positions='before_tokens' needs input_ids or inputs_embeds")
    length = adapter.config.prefix_length
    b, s = ref.shape[0], ref.shape[1]
    positions = torch.arange(length, length + s, device=ref.device).unsqueeze(0).expand(b, s)
    return {**kwargs, "position_ids": positions}


PREFIX_TUNING = register(
    Method(
        "prefix_tuning",
        PrefixTuningConfig,
        build,
        insert_prefix,
        adapterhub_key=adapterhub_key,
        adapterhub_prepare=adapterhub_prepare,
        adapterhub_name=adapterhub_name,
        compose=COMPOSE,
        call_inputs=call_inputs,
    )
)
PREFIX_TUNING_FLAT = register(
    Method(
        "prefix_tuning_flat",
        PrefixTuningFlatConfig,
        build,
        insert_prefix,
        adapterhub_key=adapterhub_key,
        adapterhub_name=adapterhub_name,
        compose=COMPOSE,
        call_inputs=call_inputs,
    )
)
