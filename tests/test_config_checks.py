"""Every method config is checked by field type and range at construction and again where it is used."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import make

import fxadapt
from fxadapt import ConfigError, LoRAConfig
from fxadapt.registry import METHODS

# one config of every method family, as a user would make it
CONFIGS = {
    "lora": lambda: fxadapt.LoRAConfig(),
    "ia3": lambda: fxadapt.IA3Config(),
    "seq_bn": lambda: fxadapt.SeqBnConfig(),
    "par_bn": lambda: fxadapt.ParBnConfig(),
    "compacter": lambda: fxadapt.CompacterConfig(reduction_factor=4),
    "seq_bn_inv": lambda: fxadapt.SeqBnInvConfig(),
    "prefix_tuning": lambda: fxadapt.PrefixTuningConfig(prefix_length=4, bottleneck_size=16),
    "prompt_tuning": lambda: fxadapt.PromptTuningConfig(prompt_length=4),
    "loreft": lambda: fxadapt.LoReftConfig(),
    "direft": lambda: fxadapt.DiReftConfig(),
}
BAD = {int: [True, 2.0, "2", None, float("inf")], float: [math.inf, -math.inf, math.nan, True, "1"]}
BAD[bool] = [1, 0, "yes", None]
BAD[list] = ["query", 3, {"a": 1}]


def _simple_fields(config):
    """(field name, kind) for the fields with one plain type, e.g. ``r: int``."""
    hints = fxadapt.config._hints(type(config))
    out = []
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        kind = hint if hint in (int, float, bool) else getattr(hint, "__origin__", None)
        if kind in BAD:
            out.append((f.name, kind))
    return out


def test_every_method_has_a_case():
    assert {m.config for m in METHODS.values()} >= {type(make()) for make in CONFIGS.values()}
    assert len(_simple_fields(LoRAConfig())) >= 8


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_wrong_types_and_non_finite_values_are_refused(method):
    """Issue 12.4 and 12.10: alpha=inf, r=True, attn_matrices="query" were accepted."""
    config = CONFIGS[method]()
    checked = 0
    for name, kind in _simple_fields(config):
        for bad in BAD[kind]:
            with pytest.raises(ConfigError, match=f"{type(config).__name__}.{name} must be"):
                dataclasses.replace(config, **{name: bad})
            checked += 1
    assert checked


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_config_changed_after_construction_is_checked_where_it_is_used(method, tmp_path):
    """Issue 12.10: c = LoRAConfig(); c.r = 0; add_adapter(c) gave ZeroDivisionError."""
    model = fxadapt.AdaptedModel(make("bert"))
    config = CONFIGS[method]()
    name, kind = _simple_fields(config)[0]
    setattr(config, name, BAD[kind][0])
    with pytest.raises(ConfigError, match=f"{name} must be"):
        model.add_adapter("x", config)
    assert list(model.adapters) == []
    model.add_adapter("ok", CONFIGS[method]())
    model.adapters["ok"].config.__dict__[name] = BAD[kind][0]
    with pytest.raises(ConfigError, match=f"{name} must be"):
        model.save_adapter(tmp_path / "ok", "ok")
    assert not (tmp_path / "ok").exists()


def test_ranges_and_the_messages_say_what_is_wrong():
    c = LoRAConfig()
    c.r = 0
    with pytest.raises(ConfigError, match=r"LoRAConfig.r must be an int >= 1, got 0"):
        fxadapt.AdaptedModel(make("bert")).add_adapter("a", c)
    with pytest.raises(ConfigError, match="alpha must be a finite number, got inf"):
        LoRAConfig(alpha=float("inf"))
    with pytest.raises(ConfigError, match=r"attn_matrices must be a list of strings \(not a string\)"):
        LoRAConfig(attn_matrices="query")
    with pytest.raises(ConfigError, match="r must be an int, got True"):
        LoRAConfig(r=True)
    with pytest.raises(ConfigError, match="r must be an int"):
        fxadapt.resolve_config("lora[r=abc]")
    with pytest.raises(ConfigError, match="must be a dict of options"):
        LoRAConfig.from_dict([1, 2])
    assert LoRAConfig(alpha=16).alpha == 16  # an int is a number
    assert fxadapt.SeqBnConfig(reduction_factor={0: 4, "default": 8}).reduction_for(0) == 4


def test_union_parts_are_checked_where_used():
    union = fxadapt.ConfigUnion(LoRAConfig(), fxadapt.PrefixTuningConfig(prefix_length=2, bottleneck_size=8))
    union.configs[0].alpha = float("nan")
    with pytest.raises(ConfigError, match="LoRAConfig.alpha must be a finite number"):
        fxadapt.AdaptedModel(make("bert")).add_adapter("u", union)


@pytest.mark.parametrize(
    "config, what",
    [
        (LoRAConfig(r=10**11), "lora"),
        (fxadapt.PrefixTuningConfig(bottleneck_size=10**9), "prefix_tuning"),
        (fxadapt.PromptTuningConfig(prompt_length=10**10), "prompt_tuning"),
        (fxadapt.SeqBnConfig(reduction_factor=1e-9), "seq_bn"),
    ],
)
def test_sizes_are_checked_against_the_model_before_allocation(config, what):
    """Issue 12.8: "r": 10**11 raised an allocation error (or exhausted memory)."""
    model = fxadapt.AdaptedModel(make("bert"))
    with pytest.raises(ConfigError, match=f"this {what} adapter would hold .* values, more than"):
        model.add_adapter("big", config)
    assert list(model.adapters) == []
