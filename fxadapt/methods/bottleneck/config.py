"""``BnConfig`` (every option of AdapterHub's) and its presets with AdapterHub's defaults."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ...config import AdapterConfig, check
from ..activations import activation_names

LOCATIONS = ("mh_adapter", "output_adapter", "cross_adapter")
INITS = ("bert", "mam_adapter", "houlsby")
INV_ADAPTERS = ("nice", "glow")
PHM_INITS = ("phm", "glorot-normal", "glorot-uniform", "normal")


@dataclasses.dataclass
class BnConfig(AdapterConfig):
    """A bottleneck adapter, with all of AdapterHub's ``BnConfig`` options and defaults.

    ``mh_adapter``, ``output_adapter``, ``reduction_factor`` and ``non_linearity`` have no default
    (as in AdapterHub); the presets below set them.
    """

    architecture = "bottleneck"

    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    reduction_factor: float | dict[str | int, float] | None = None
    non_linearity: str | None = None
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: list[int] = dataclasses.field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 0.0001
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    stochastic_depth: float = 0.0

    def to_adapterhub_dict(self) -> dict[str, Any]:
        out = super().to_adapterhub_dict()
        del out["architecture"]  # AdapterHub's BnConfig has none: a config without one is a bottleneck
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        legacy = data.pop("invertible_adapter", None)  # adapter-transformers v1 nested the inv options
        if legacy:
            data.setdefault("inv_adapter", legacy.get("block_type"))
            data.setdefault("inv_adapter_reduction_factor", legacy.get("reduction_factor"))
        return super().from_dict(data)

    def validate(self) -> None:
        name = type(self).__name__
        required = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
        unset = [k for k in required if getattr(self, k) is None]
        check(
            not unset,
            f"{name} needs {unset} (AdapterHub's BnConfig has no default for them); "
            "or start from a preset such as SeqBnConfig, DoubleSeqBnConfig or ParBnConfig",
        )
        for key in (*LOCATIONS, "original_ln_before", "original_ln_after", "ln_before", "ln_after"):
            check(isinstance(getattr(self, key), bool), f"{name}.{key} must be True or False")
        flags = (
            "is_parallel",
            "use_gating",
            "adapter_residual_before_ln",
            "phm_layer",
            "learn_phm",
            "phm_bias",
        )
        flags += ("shared_phm_rule", "factorized_phm_rule", "shared_W_phm", "factorized_phm_W")
        for key in flags:
            check(isinstance(getattr(self, key), bool), f"{name}.{key} must be True or False")
        _check_reduction(name, "reduction_factor", self.reduction_factor, allow_map=True)
        acts = activation_names()
        check(
            isinstance(self.non_linearity, str) and self.non_linearity.lower() in acts,
            f"{name}.non_linearity {self.non_linearity!r} is not known; valid: {acts}",
        )
        check(self.init_weights in INITS, f"{name}.init_weights {self.init_weights!r}; valid: {list(INITS)}")
        check(
            self.init_weights_seed is None or isinstance(self.init_weights_seed, int),
            f"{name}.init_weights_seed must be an int or None",
        )
        check(
            self.scaling in ("learned", "channel")
            or (isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)),
            f"{name}.scaling must be a number, 'learned' or 'channel', got {self.scaling!r}",
        )
        check(
            self.residual_before_ln is True
            or self.residual_before_ln is False
            or self.residual_before_ln == "post_add",
            f"{name}.residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}",
        )
        check(
            self.residual_before_ln != "post_add" or self.original_ln_before,
            f"{name}.residual_before_ln='post_add' needs original_ln_before=True",
        )
        check(
            self.inv_adapter is None or self.inv_adapter in INV_ADAPTERS,
            f"{name}.inv_adapter {self.inv_adapter!r}; valid: None, {list(INV_ADAPTERS)}",
        )
        if self.inv_adapter is not None:
            _check_reduction(name, "inv_adapter_reduction_factor", self.inv_adapter_reduction_factor)
        check(
            isinstance(self.leave_out, (list, tuple)) and all(isinstance(i, int) for i in self.leave_out),
            f"{name}.leave_out must list layer indices (ints)",
        )
        for key in ("dropout", "stochastic_depth"):
            value = getattr(self, key)
            check(
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
                f"{name}.{key} must be in [0, 1), got {value!r}",
            )
        check(isinstance(self.phm_dim, int) and self.phm_dim >= 1, f"{name}.phm_dim must be an int >= 1")
        check(isinstance(self.phm_rank, int) and self.phm_rank >= 1, f"{name}.phm_rank must be an int >= 1")
        check(self.phm_c_init in ("normal", "uniform"), f"{name}.phm_c_init must be 'normal' or 'uniform'")
        check(
            self.hypercomplex_nonlinearity in PHM_INITS,
            f"{name}.hypercomplex_nonlinearity {self.hypercomplex_nonlinearity!r}; valid: {list(PHM_INITS)}",
        )
        check(
            isinstance(self.phm_init_range, (int, float)) and self.phm_init_range > 0,
            f"{name}.phm_init_range must be > 0",
        )
        check(
            not (self.phm_layer and self.init_weights == "houlsby"),
            f"{name}: init_weights='houlsby' is not defined for PHM layers (phm_layer=True); "
            "use 'bert' (PHM initialisation) or 'mam_adapter' (up-projection zero)",
        )
        check(
            not (self.phm_layer and self.shared_W_phm and isinstance(self.reduction_factor, dict)),
            f"{name}: shared_W_phm=True needs one reduction_factor for all layers, not a mapping",
        )

    def reduction_for(self, layer: int) -> float:
        """The reduction factor of a layer (AdapterHub's per-layer mapping: ``"<index>"`` or ``"default"``)."""
        rf = self.reduction_factor
        if not isinstance(rf, dict):
            return rf
        for key in (str(layer), layer, "default"):
            if key in rf:
                return rf[key]
        raise KeyError(layer)


def _check_reduction(name: str, key: str, value: Any, allow_map: bool = False) -> None:
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)

    if allow_map and isinstance(value, dict):
        bad = {k: v for k, v in value.items() if not ok(v)}
        check(not bad, f"{name}.{key} has values that are not numbers > 0: {bad}")
        keys = [k for k in value if k != "default" and not str(k).lstrip("-").isdigit()]
        check(not keys, f"{name}.{key} keys must be layer indices or 'default', got {keys}")
        return
    check(ok(value), f"{name}.{key} must be a number > 0, got {value!r}")


@dataclasses.dataclass
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the FFN, after the layer's own norm."""

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict[str | int, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False


@dataclasses.dataclass
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after the attention block and after the FFN."""

    mh_adapter: bool = True
    output_adapter: bool = True
    reduction_factor: float | dict[str | int, float] = 16
    non_linearity: str = "swish"
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False


@dataclasses.dataclass
class ParBnConfig(BnConfig):
    """He et al. (2021): an adapter beside the FFN, reading the block's input, scaled by 4."""

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict[str | int, float] = 2
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


@dataclasses.dataclass
class ScaledParBnConfig(ParBnConfig):
    """AdapterHub's ``"scaled_par_bn"``: the parallel adapter with a learned scalar scaling."""

    scaling: float | str = "learned"


@dataclasses.dataclass
class AdapterPlusConfig(BnConfig):
    """Steitz & Roth (2024), Adapter+: channel-wise scaling, Houlsby init, stochastic depth."""

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict[str | int, float] = 2
    non_linearity: str = "gelu"
    original_ln_after: bool = False
    residual_before_ln: bool | str = True
    stochastic_depth: float = 0.1
    init_weights: str = "houlsby"
    scaling: float | str = "channel"
