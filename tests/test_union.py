"""Config unions (ConfigUnion, MAM, UniPELT, "a|b" strings) and the gating UniPELT needs in LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import batch, compiled_graph_count, main_output, make

import fxadapt
from fxadapt import (
    ConfigError,
    ConfigUnion,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    UniPELTConfig,
)
from fxadapt.adapter import slot
from fxadapt.heads.static import task_head

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


def _randomize(model: fxadapt.AdaptedModel, name: str, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _parts_as_adapters(model: fxadapt.AdaptedModel, name: str) -> list[str]:
    """Each part of union ``name`` as its own adapter with the same weights; returns their names."""
    union = model.adapters[name]
    names = []
    for i, (_, config, keys) in enumerate(union.parts()):
        part = f"{name}_part{i}"
        model.add_adapter(part, config)
        for key, module in model.adapters[part].items():
            module.load_state_dict(union.layers[slot(keys[key])].state_dict())
        names.append(part)
    return names


# ---- config strings and config objects -----------------------------------------------------------


def test_config_strings_follow_adapterhub_syntax():
    assert fxadapt.resolve_config("lora[r=4,alpha=16]") == LoRAConfig(r=4, alpha=16)
    assert fxadapt.resolve_config("seq_bn[reduction_factor=4, non_linearity=swish]") == SeqBnConfig(
        reduction_factor=4, non_linearity="swish"
    )
    assert fxadapt.resolve_config("lora[attn_matrices=['q','k'], leave_out=[0]]").attn_matrices == ["q", "k"]
    union = fxadapt.resolve_config("lora | prefix_tuning[prefix_length=5]")
    assert type(union) is ConfigUnion
    assert union.configs == [LoRAConfig(), PrefixTuningConfig(prefix_length=5)]
    assert fxadapt.resolve_config("mam") == MAMConfig()
    assert fxadapt.resolve_config("unipelt") == UniPELTConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("lorra", "valid names: adapter_plus"),
        ("lora[r]", "'r' is not of the form option=value"),
        ("lora[rank=4]", "has no option(s) ['rank']"),
        ("lora[r=0]", "r must be an int >= 1"),
        ("lora|lora", "both 'lora' adapters at the same places"),
        ("seq_bn|par_bn", "both 'bottleneck' adapters"),
        ("lora|nope", "unknown adapter method 'nope'"),
    ],
)
def test_bad_config_strings_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError) as err:
        fxadapt.resolve_config(text)
    assert message in str(err.value)


def test_presets_have_adapterhubs_parts_and_defaults():
    mam = MAMConfig()
    assert mam.prefix_tuning == PrefixTuningConfig(bottleneck_size=800) and mam.adapter == ParBnConfig()
    unipelt = UniPELTConfig()
    assert unipelt.configs == [
        PrefixTuningConfig(prefix_length=10, use_gating=True),
        SeqBnConfig(reduction_factor=16, use_gating=True),
        LoRAConfig(r=8, use_gating=True),
    ]
    # bottleneck parts at different places may share a union, as in AdapterHub
    ConfigUnion(SeqBnConfig(), SeqBnConfig(mh_adapter=True, output_adapter=False))
    ConfigUnion(LoRAConfig(), LoRAConfig(leave_out=[0]))
    with pytest.raises(ConfigError, match="cannot contain another union"):
        ConfigUnion(LoRAConfig(), MAMConfig())
    with pytest.raises(ConfigError, match="MAMConfig.adapter must be a bottleneck"):
        MAMConfig(adapter=LoRAConfig())


def test_union_dict_roundtrip_keeps_presets():
    for config in (MAMConfig(), UniPELTConfig(), ConfigUnion(SeqBnConfig(), IA3Config())):
        again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config and type(again.configs[0]) is type(config.configs[0])
    with pytest.raises(ConfigError, match="no option"):
        ConfigUnion.from_dict({"architecture": "union", "configs": [], "extra": 1})


# ---- LoRA gating (AdapterHub's use_gating) --------------------------------------------------------


def _hooked_reference(hf, adapter, fused_sections=None):
    """The gated update written out with forward hooks on the HF projections (AdapterHub's formula)."""
    hooks = []
    for key, mod in adapter.items():
        proj = hf.get_submodule(key)

        def hook(module, inp, out, mod=mod):
            x = inp[0]
            gate = torch.sigmoid(x @ mod.gate.weight.T + mod.gate.bias).mean(1)  # (batch, heads)
            if isinstance(mod, fxadapt.methods.lora.LoRAScale):
                vec = mod.lora_B.reshape(-1)
                return out * vec * gate[:, None, :]
            if fused_sections is None:
                return out + (x @ mod.lora_A.T @ mod.lora_B.T) * gate[:, None, :]
            r = mod.lora_A.shape[0] // len(fused_sections)
            delta = torch.zeros_like(out)
            rows = 0
            for i, (a, b) in enumerate(fused_sections):
                A = mod.lora_A[i * r : (i + 1) * r]
                B = mod.lora_B[rows : rows + b - a]
                rows += b - a
                delta[..., a:b] = (x @ A.T @ B.T) * gate[:, None, i : i + 1]
            return out + delta

        hooks.append(proj.register_forward_hook(hook))
    return hooks


@pytest.mark.parametrize("arch, config", [("bert", LoRAConfig), ("gpt2", LoRAConfig), ("bert", IA3Config)])
def test_gated_lora_matches_adapterhubs_formula(arch, config):
    hf = make(arch).eval()
    model = fxadapt.AdaptedModel(hf)
    model.add_adapter("g", config(use_gating=True), set_active=True)
    _randomize(model, "g", 0.3)
    model.eval()
    sections = None
    if arch == "gpt2":  # c_attn holds q, k, v: the q and v blocks each get their own gate
        d = hf.config.n_embd
        sections = [(0, d), (2 * d, 3 * d)]
        assert next(iter(model.adapters["g"].layers.values())).gate.out_features == 2
    with torch.no_grad():
        ours = model(**batch()).last_hidden_state
        hooks = _hooked_reference(hf, model.adapters["g"], sections)
        reference = hf(**batch()).last_hidden_state
    for h in hooks:
        h.remove()
    with torch.no_grad():
        plain = hf(**batch()).last_hidden_state
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_gated_lora_cannot_merge_and_weights_stay():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("u", UniPELTConfig(), set_active=True)
    model.add_adapter("g", ConfigUnion(IA3Config(), LoRAConfig(use_gating=True, leave_out=[0])))
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    with pytest.raises(ConfigError, match="prefix_tuning, seq_bn adapters cannot be merged"):
        model.merge_adapter("u")
    with pytest.raises(ConfigError, match="gated LoRA"):  # refused after the (IA)^3 part was folded
        model.merge_adapter("g")
    assert model.merged_adapters == ()
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_union_of_foldable_parts_merges_and_resets():
    model = fxadapt.AdaptedModel(make("bert")).eval()
    config = ConfigUnion(LoRAConfig(), IA3Config(selfattn_lora=False, leave_out=[0]))
    model.add_adapter("u", config, set_active=True)
    _randomize(model, "u")
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    with torch.no_grad():
        unmerged = model(**batch()).last_hidden_state
        model.merge_adapter("u")
        merged = model(**batch()).last_hidden_state
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    model.reset_adapter("u")
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- a union computes what its parts compute ------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "bart"])
@pytest.mark.parametrize("config", ["mam", "unipelt", "lora[output_lora=True]|seq_bn|prompt_tuning"])
def test_union_equals_its_parts_stacked(arch, config):
    if arch == "bart" and "prompt_tuning" in config:
        pytest.skip("prompt tuning on an encoder-decoder prepends to the encoder only: covered elsewhere")
    model = fxadapt.AdaptedModel(make(arch))
    model.add_adapter("u", config, set_active=True)
    _randomize(model, "u")
    model.eval()
    inputs = batch()
    if arch == "bart":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    with torch.no_grad():
        ours = main_output(model(**inputs))
        model.set_active_adapters(_parts_as_adapters(model, "u"))
        stacked = main_output(model(**inputs))
        model.set_active_adapters(None)
        plain = main_output(model(**inputs))
    assert ours.shape == stacked.shape
    torch.testing.assert_close(ours, stacked, atol=1e-6, rtol=0)
    assert ours.shape != plain.shape or (ours - plain).abs().max() > 1e-3


def test_summary_and_parameter_count():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("u", "unipelt")
    names = _parts_as_adapters(model, "u")
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["u"]["architecture"] == "unipelt"
    assert rows["u"]["num_params"] == sum(rows[n]["num_params"] for n in names)
    assert [rows[n]["architecture"] for n in names] == ["prefix_tuning", "seq_bn", "lora"]


# ---- training, compile, files ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "bart"])
@pytest.mark.parametrize("config", ["mam", "unipelt"])
def test_training_lowers_loss_and_leaves_base_alone(arch, config):
    base = make(arch, head=arch in ("bert", "llama"), initializer_range=0.2)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = fxadapt.adapt(base, config, compile=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    inputs = batch(8, 12, pad=0)
    if arch == "bart":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    target = torch.randn(8, 5 if arch == "bart" else 12, 32, generator=torch.Generator().manual_seed(0))

    def loss_of() -> torch.Tensor:
        if arch == "bert":
            return model(**inputs, labels=torch.arange(8) % 2).loss
        if arch == "llama":
            return model(**inputs, labels=inputs["input_ids"]).loss
        return torch.nn.functional.mse_loss(main_output(model(**inputs)), target)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = loss_of().item()
        model.train()
        return loss

    start = eval_loss()
    for _ in range(20):
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.9 * start
    head = set(task_head(base))
    for k, v in base.state_dict().items():
        assert k in head or torch.equal(v, before[k]), k  # a static task head trains too


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("config", ["mam", "unipelt"])
@pytest.mark.parametrize("training", [True, False])
def test_zero_graph_breaks(arch, config, training):
    assert compiled_graph_count(arch, config, training) == 1


@pytest.mark.parametrize("config", ["mam", "unipelt", "lora|seq_bn[mh_adapter=True]|prompt_tuning"])
def test_save_load_roundtrip_is_bitwise(tmp_path, config):
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("u", config, set_active=True)
    _randomize(model, "u")
    model.eval()
    model.save_adapter(tmp_path, "u")
    other = fxadapt.AdaptedModel(make("bert")).eval()
    assert other.load_adapter(tmp_path, set_active=True) == "u"
    assert other.adapters["u"].config == model.adapters["u"].config
    for (k, p), (_, q) in zip(model.adapters.state_dict().items(), other.adapters.state_dict().items()):
        assert torch.equal(p, q), k
    with torch.no_grad():
        assert torch.equal(other(**batch()).last_hidden_state, model(**batch()).last_hidden_state)


def test_adapterhub_union_folder_loads_as_its_parts(tmp_path):
    """A union folder in AdapterHub's layout (config ``architecture: union``, each part's tensors under
    its own AdapterHub names), made from three AdapterHub cases that share one base model."""
    cases = ["bert__lora", "bert__prefix_tuning", "bert__seq_bn"]
    base_file = FIXTURES / cases[0] / "base" / "model.safetensors"
    for case in cases:
        assert (FIXTURES / case / "base" / "model.safetensors").read_bytes() == base_file.read_bytes()
    configs, tensors = [], {}
    for case in cases:
        raw = json.loads((FIXTURES / case / "adapter" / "adapter_config.json").read_text())
        configs.append(raw["config"])
        weights = next((FIXTURES / case / "adapter").glob("*adapter.*[bn]*"))
        tensors.update(fxadapt.formats.fileio.read_tensors(weights))
    union_dir = tmp_path / "union"
    union_dir.mkdir()
    raw["config"] = {"architecture": "union", "configs": configs}
    (union_dir / "adapter_config.json").write_text(json.dumps(raw))
    torch.save(tensors, union_dir / "pytorch_adapter.bin")

    from transformers import AutoModel

    model = fxadapt.AdaptedModel(AutoModel.from_pretrained(FIXTURES / cases[0] / "base")).eval()
    name = model.load_adapter(union_dir, load_as="u", set_active=True)
    assert type(model.adapters[name].config) is ConfigUnion
    for i, case in enumerate(cases):
        part = tmp_path / case
        shutil.copytree(FIXTURES / case / "adapter", part)
        model.load_adapter(part, load_as=f"p{i}")
    inputs = batch()
    with torch.no_grad():
        ours = model(**inputs).last_hidden_state
        model.set_active_adapters(["p0", "p1", "p2"])
        stacked = model(**inputs).last_hidden_state
    torch.testing.assert_close(ours, stacked, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", ["mam", "unipelt"])
def test_adapterhub_format_roundtrip_and_names_are_the_parts_names(tmp_path, config):
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("u", config, set_active=True)
    _randomize(model, "u")
    model.eval()
    model.save_adapter(tmp_path / "u", "u", format="adapterhub")
    raw = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert raw["config"]["architecture"] == "union"
    assert raw["config"]["configs"] == [c.to_adapterhub_dict() for c in model.adapters["u"].config.configs]
    written = set(fxadapt.formats.fileio.read_tensors(tmp_path / "u" / "pytorch_adapter.bin"))
    expected = set()
    for part in _parts_as_adapters(model, "u"):
        model.save_adapter(tmp_path / part, part, format="adapterhub")
        names = fxadapt.formats.fileio.read_tensors(tmp_path / part / "pytorch_adapter.bin")
        expected |= {k.replace(f".{part}.", ".u.") for k in names}
    assert written == expected
    other = fxadapt.AdaptedModel(make("bert")).eval()
    other.load_adapter(tmp_path / "u", set_active=True)
    assert other.adapters["u"].config.to_adapterhub_dict() == raw["config"]
    model.set_active_adapters("u")
    with torch.no_grad():
        assert torch.equal(other(**batch()).last_hidden_state, model(**batch()).last_hidden_state)
