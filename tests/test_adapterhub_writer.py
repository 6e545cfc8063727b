"""``save_adapter(..., format="adapterhub")``: the folder AdapterHub's own ``save_adapter`` writes.

The oracle is AdapterHub's files in ``fixtures/adapterhub``: each case's adapter, loaded into fxadapt
and written back, must give the same tensor names, the same tensors bit for bit, the same ``config``
and the same model-determined metadata, and must load again to AdapterHub's expected output.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import transformers
from conftest import batch, main_output, make
from test_adapterhub import FIXTURES, SUPPORTED, assert_reproduces_case

import fxadapt
from fxadapt import (
    CompacterConfig,
    ConfigError,
    DiReftConfig,
    DoubleSeqBnInvConfig,
    LoRAConfig,
    LoReftConfig,
    NoReftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
)
from fxadapt import registry as methods_module
from fxadapt.formats.fileio import first_existing, read_tensors

COMPACTER = "bert__compacter__reduction_factor-4"
CASES = [*SUPPORTED, COMPACTER]
BIN = "pytorch_adapter.bin"


def _tensors(folder) -> dict[str, torch.Tensor]:
    return read_tensors(first_existing(folder, ("adapter.safetensors", BIN)))


def _config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def test_the_cases_are_every_fixture():
    assert sorted(CASES) == sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASES)
def test_an_adapterhub_adapter_is_written_back_as_adapterhub_wrote_it(tmp_path, case):
    theirs_folder = FIXTURES / case / "adapter"
    # the case's own class: a model with a head (bert__compacter_head) names its tensors "bert.*"
    model_class = json.loads((FIXTURES / case / "case.json").read_text())["model_class"]
    base = getattr(transformers, model_class).from_pretrained(
        FIXTURES / case / "base", attn_implementation="eager"
    )
    model = fxadapt.AdaptedModel(base).eval()
    if case == COMPACTER:  # the shared rule AdapterHub did not save is initialised afresh (warned)
        with pytest.warns(UserWarning, match="shared parameters"):
            name = model.load_adapter(theirs_folder)
        # ... and AdapterHub's save filter leaves it out again for a model without a head
        with pytest.warns(UserWarning, match=r"does not hold \['shared_parameters.a.phm_rule'\]"):
            model.save_adapter(tmp_path / case, name, format="adapterhub", with_head=False)
    else:
        name = model.load_adapter(theirs_folder)
        model.save_adapter(tmp_path / case, name, format="adapterhub", with_head=False)
    ours_folder = tmp_path / case
    assert sorted(os.listdir(ours_folder)) == ["adapter_config.json", BIN]

    # (1) the same tensor names, and every tensor bit for bit
    ours = torch.load(ours_folder / BIN, weights_only=True)
    theirs = _tensors(theirs_folder)
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        assert torch.equal(ours[key], t), key

    # (2) the same config: both sides are parsed JSON, so AdapterHub's tuples are lists on both; no
    # other normalisation is needed (AdapterHub compares configs by to_dict(), i.e. these values)
    ours_meta, theirs_meta = _config(ours_folder), _config(theirs_folder)
    assert ours_meta["config"] == theirs_meta["config"]

    # (3) the same top-level keys; the values a model determines agree
    assert sorted(ours_meta) == sorted(theirs_meta)
    for key in ("model_class", "model_type", "hidden_size", "name", "version"):
        assert ours_meta[key] == theirs_meta[key], key
    # AdapterHub writes config.name_or_path: "" where the case was made, the base folder here
    assert ours_meta["model_name"] == base.config.name_or_path

    # and the written folder computes AdapterHub's output (the compacter's rule is not in any file)
    if case in SUPPORTED:
        assert_reproduces_case(case, ours_folder)


def _perturb(adapter) -> None:
    """Random adapter weights, so that an identity initialisation cannot hide a wrong mapping.

    A parametrization's ``original`` is left alone: LoReFT's orthogonal one reads signs off its
    diagonal (and starts random anyway).
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "parametrizations" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# (arch, with a head, config, names that must be written, names that must not)
ROUND_TRIPS = {
    "loreft": (
        "bert",
        False,
        LoReftConfig(prefix_positions=2, suffix_positions=1),
        [
            "encoder.layer.0.reft_layer.refts.a.units.0.learned_source.weight",
            "encoder.layer.1.reft_layer.refts.a.units.1.projection.parametrizations.weight.original",
        ],
        [],
    ),
    "noreft-tied": (
        "bert",
        False,
        NoReftConfig(tied_weights=True),
        ["encoder.layer.1.reft_layer.refts.a.units.0.projection.weight"],
        ["encoder.layer.1.reft_layer.refts.a.units.1.projection.weight"],
    ),
    "gpt2-fused-lora": (
        "gpt2",
        False,
        LoRAConfig(attn_matrices=["q", "k", "v"], init_weights="bert"),
        ["h.0.attn.c_attn.loras.a.lora_A", "h.1.attn.c_attn.loras.a.lora_B"],
        [],
    ),
    "ln-before": (
        "bert",
        False,
        SeqBnConfig(ln_before=True),
        [
            "encoder.layer.0.output.adapters.a.adapter_down.0.weight",
            "encoder.layer.0.output.adapters.a.adapter_norm_before.weight",
            "encoder.layer.0.output.adapters.a.adapter_down.1.weight",
        ],
        [],
    ),
    "head-compacter": (
        "bert",
        True,
        CompacterConfig(reduction_factor=4),
        [
            "bert.shared_parameters.a.phm_rule",
            "bert.encoder.layer.0.attention.output.adapters.a.adapter_up.W_left",
        ],
        [],
    ),
    "head-inv": ("bert", True, SeqBnInvConfig(), ["bert.invertible_adapters.a.F.0.weight"], []),
    "head-gated-prefix": (
        "bert",
        True,
        PrefixTuningConfig(prefix_length=4, bottleneck_size=16, use_gating=True, leave_out=[1]),
        [
            "bert.prefix_tuning.prefix_tunings.a.self_prefix.wte.weight",
            "bert.encoder.layer.0.attention.self.prefix_tuning.pool.prefix_tunings.a.self_prefix.wte.weight",
            "bert.encoder.layer.1.attention.self.prefix_tuning.pool.prefix_tunings.a.self_prefix.wte.weight",
            "bert.encoder.layer.0.attention.self.prefix_tuning.prefix_gates.a.weight",
        ],
        ["bert.encoder.layer.1.attention.self.prefix_tuning.prefix_gates.a.weight"],
    ),
    "head-prompt": (
        "bert",
        True,
        PromptTuningConfig(prompt_length=3),
        ["bert.prompt_tuning.prompt_tunings.a.prompt_embedding.weight"],
        [],
    ),
    "bart-cross-inv": (
        "bart",
        False,
        DoubleSeqBnInvConfig(cross_adapter=True),
        [
            "encoder.invertible_adapters.a.F.0.weight",
            "encoder.layers.0.attention_adapters.adapters.a.adapter_up.weight",
            "decoder.layers.0.cross_attention_adapters.adapters.a.adapter_up.weight",
            "decoder.layers.0.output_adapters.adapters.a.adapter_up.weight",
        ],
        [],
    ),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_through_adapterhubs_format(tmp_path, case):
    arch, head, config, present, absent = ROUND_TRIPS[case]
    model = fxadapt.AdaptedModel(make(arch, head=head))
    model.add_adapter("a", config, set_active=True)
    _perturb(model.adapters["a"])
    model.save_adapter(tmp_path / "a", "a", format="adapterhub")
    written = torch.load(tmp_path / "a" / BIN, weights_only=True)
    assert set(present) <= set(written) and not set(absent) & set(written)
    if head:  # AdapterHub keeps every adapter module in the base model
        assert all(k.startswith("bert.") for k in written)
    if "prefix" in case:  # the pool, once per attention layer and once at the top: one tensor
        copies = [v for k, v in written.items() if k.endswith("self_prefix.wte.weight")]
        assert len(copies) == 3 and all(torch.equal(c, copies[0]) for c in copies)

    other = fxadapt.AdaptedModel(make(arch, head=head))
    assert other.load_adapter(tmp_path / "a", set_active=True) == "a"
    # the options come back; the preset class does not (AdapterHub's configs name no preset)
    assert other.adapters["a"].config.to_dict() == model.adapters["a"].config.to_dict()
    for k, v in model.adapters["a"].state_dict().items():
        assert torch.equal(v, other.adapters["a"].state_dict()[k]), k
    model.eval()
    other.eval()
    inputs = batch()
    if arch == "bart":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    with torch.no_grad():
        ours = main_output(model(**inputs))
        again = main_output(other(**inputs))
        plain = main_output(make(arch, head=head).eval()(**inputs))
    assert torch.equal(ours, again)
    if ours.shape == plain.shape:  # prompt tuning makes the output longer
        assert (ours - plain).abs().max() > 1e-3 * plain.abs().max()  # the adapter does something


def test_the_config_has_exactly_adapterhubs_keys(tmp_path):
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("lo", LoReftConfig(r=2))
    model.add_adapter("pt", PromptTuningConfig(random_uniform_scale=0.1))
    for name in ("lo", "pt"):
        model.save_adapter(tmp_path / name, name, format="adapterhub")
    # AdapterHub's ReftConfig fields (subtract_projection is a plain class attribute there, no field)
    reft_keys = {
        "architecture", "layers", "prefix_positions", "suffix_positions", "r", "orthogonality",
        "tied_weights", "dropout", "non_linearity", "dtype", "output_reft", "init_weights_seed",
    }  # fmt: skip
    lo = _config(tmp_path / "lo")["config"]
    assert set(lo) == reft_keys and lo["architecture"] == "reft" and lo["r"] == 2
    # random_uniform_scale, a class attribute in AdapterHub too, only draws the first prompt: dropped
    pt = _config(tmp_path / "pt")["config"]
    assert pt == _config(FIXTURES / "bert__prompt_tuning" / "adapter")["config"]


@pytest.mark.parametrize(
    "arch, config, option",
    [
        ("gpt2", LoRAConfig(fused_qkv="joint"), "fused_qkv='joint'"),
        ("bert", LoRAConfig(target_sites=["encoder.layer.0.attention.self.query"]), "target_sites="),
        # AdapterHub always rebuilds ReFT with subtract_projection=True (its own DiReFT files lose it)
        ("bert", DiReftConfig(), "subtract_projection=False"),
    ],
)
def test_options_adapterhub_cannot_express_are_refused(tmp_path, arch, config, option):
    model = fxadapt.AdaptedModel(make(arch))
    model.add_adapter("a", config)
    with pytest.raises(
        ConfigError, match=rf"option {option}.* cannot be written in AdapterHub's format.*format='fxadapt'"
    ):
        model.save_adapter(tmp_path / "out", "a", format="adapterhub")
    assert not (tmp_path / "out").exists()


def test_token_ids_as_prompt_text_are_refused(tmp_path):
    model = fxadapt.AdaptedModel(make("bert"))
    emb = model.base.get_input_embeddings()
    model.add_adapter(
        "a", PromptTuningConfig(prompt_init="from_string", prompt_init_text=[5, 6], embeddings=emb)
    )
    with pytest.raises(ConfigError, match="token ids"):
        model.save_adapter(tmp_path / "out", "a", format="adapterhub")
    assert not (tmp_path / "out").exists()


def test_unknown_format_lists_the_valid_ones(tmp_path):
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", "lora")
    with pytest.raises(
        ConfigError, match=r"unknown adapter file format 'onnx'; valid: \['adapterhub', 'fxadapt', 'peft'\]"
    ):
        model.save_adapter(tmp_path / "out", "a", format="onnx")
    assert not (tmp_path / "out").exists()


def test_a_method_without_adapterhub_names_is_refused(tmp_path, monkeypatch):
    lora = methods_module.METHODS["lora"]
    monkeypatch.setitem(methods_module.METHODS, "lora", dataclasses.replace(lora, adapterhub_name=None))
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", "lora")
    with pytest.raises(ConfigError, match=r"'lora', which has no AdapterHub tensor names"):
        model.save_adapter(tmp_path / "out", "a", format="adapterhub")
    assert not (tmp_path / "out").exists()


def test_over_an_fxadapt_folder_the_stale_safetensors_go(tmp_path):
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", LoRAConfig(init_weights="bert"))
    model.save_adapter(tmp_path / "a", "a")
    model.save_adapter(tmp_path / "a", "a", format="adapterhub")
    # AdapterHub with use_safetensors=True, and fxadapt, would read adapter.safetensors first
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", BIN]
    other = fxadapt.AdaptedModel(make("bert"))
    other.load_adapter(tmp_path / "a")
    for k, v in model.adapters["a"].state_dict().items():
        assert torch.equal(v, other.adapters["a"].state_dict()[k])
