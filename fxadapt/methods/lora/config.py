"""``LoRAConfig``: AdapterHub's LoRA options and defaults, plus fxadapt's layout of fused projections."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...config import AdapterConfig, check

ATTN_MATRICES = ("q", "k", "v", "o")
INITS = ("lora", "bert", "ia3", "vera")
MODES = ("add", "scale")


@dataclasses.dataclass
class LoRAConfig(AdapterConfig):
    """LoRA on the attention matrices (and optionally the FFN), AdapterHub's defaults."""

    architecture = "lora"
    foreign_defaults = {
        "use_dora": False,
        "vera_d": None,
        "vera_b": None,
        "dtype": None,
        "init_weights_seed": None,
    }
    # AdapterHub gives a fused projection one block per matrix (fused_qkv="split") and picks sites
    # only by selfattn_lora/attn_matrices/intermediate_lora/output_lora/leave_out
    local_options = {
        "fused_qkv": "split",
        "target_sites": None,
        "adapterhub_sites": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list[int] = dataclasses.field(default_factory=list)
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    attn_matrices: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    composition_mode: str = "add"
    init_weights: str = "lora"
    use_gating: bool = False
    fused_qkv: str = "split"
    target_sites: list[str] | None = None
    # target_sites were read from an AdapterHub file, whose model code chose them from the role options
    adapterhub_sites: bool = False
    # PEFT's per-module rank and alpha ({site key: value}), read from PEFT files
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r >= 1, f"LoRAConfig.r must be an int >= 1, got {self.r!r}")
        check(self.alpha > 0, f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        check(0 <= self.dropout < 1, f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        bad = [m for m in self.attn_matrices if m not in ATTN_MATRICES]
        check(not bad, f"LoRAConfig.attn_matrices has {bad}; valid: {list(ATTN_MATRICES)}")
        check(
            self.composition_mode in MODES,
            f"LoRAConfig.composition_mode {self.composition_mode!r} is not valid; valid: {list(MODES)}",
        )
        check(
            self.composition_mode == "add" or self.r == 1,
            f"composition_mode='scale' learns one vector per projection, so r must be 1, got {self.r}",
        )
        check(self.init_weights in INITS, f"LoRAConfig.init_weights must be one of {list(INITS)}")
        check(self.fused_qkv in ("split", "joint"), "LoRAConfig.fused_qkv must be 'split' or 'joint'")
        check(all(isinstance(i, int) for i in self.leave_out), "LoRAConfig.leave_out must list layer ints")
        for name, values in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            check(isinstance(values, dict), f"LoRAConfig.{name} must map site keys to values, got {values!r}")
        check(
            all(isinstance(v, int) and v >= 1 for v in self.rank_pattern.values()),
            f"LoRAConfig.rank_pattern values must be ints >= 1, got {self.rank_pattern}",
        )
        check(all(v > 0 for v in self.alpha_pattern.values()), "LoRAConfig.alpha_pattern values must be > 0")
        check(
            not self.adapterhub_sites or self.target_sites is not None,
            "LoRAConfig.adapterhub_sites=True describes target_sites read from an AdapterHub file; set both",
        )

    def for_site(self, key: str) -> LoRAConfig:
        """The config of one site: ``rank_pattern``/``alpha_pattern`` applied."""
        if key not in self.rank_pattern and key not in self.alpha_pattern:
            return self
        return dataclasses.replace(
            self, r=self.rank_pattern.get(key, self.r), alpha=self.alpha_pattern.get(key, self.alpha)
        )

    def to_adapterhub_dict(self) -> dict[str, Any]:
        if self.adapterhub_sites:  # AdapterHub picks these very sites again from the role options
            return self.replace(target_sites=None, adapterhub_sites=False).to_adapterhub_dict()
        return super().to_adapterhub_dict()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
