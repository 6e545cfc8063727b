"""LoRA against its oracles: the base model (identity), PEFT (same weights), AdapterHub's cases."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, main_output, make
from peft import LoraConfig, get_peft_model

import fxadapt
from fxadapt import LoRAConfig


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_identity_at_init(arch):
    base = make(arch).eval()
    model = fxadapt.adapt(copy.deepcopy(base), LoRAConfig(attn_matrices=["q", "k", "v", "o"]), compile=False)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(model(**inputs)), main_output(base(**inputs)), atol=1e-6, rtol=0
        )
    added = [n for n in model.graph_module.graph.nodes if n.op == "call_module"]
    assert len(added) == 2 * (3 if arch == "gpt2" else 4) - (2 if arch == "gpt2" else 0)


PEFT_CASES = {
    "bert": (["query", "value"], LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"])),
    "gpt2": (["c_attn"], LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], fused_qkv="joint")),
    "llama": (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        LoRAConfig(
            r=4, alpha=8, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, output_lora=True
        ),
    ),
}


def _peft(arch):
    targets, _ = PEFT_CASES[arch]
    base = make(arch).eval()
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ).eval()
    return base, peft_model


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_same_weights_as_peft_give_same_outputs(arch):
    base, peft_model = _peft(arch)
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("p", PEFT_CASES[arch][1], set_active=True)
    model.eval()
    peft_modules = dict(peft_model.base_model.model.named_modules())
    for key, module in model.adapters["p"].items():
        with torch.no_grad():
            module.lora_A.copy_(peft_modules[key].lora_A["default"].weight)
            module.lora_B.copy_(peft_modules[key].lora_B["default"].weight)
    assert len(model.adapters["p"].site_keys) == (14 if arch == "llama" else 2 if arch == "gpt2" else 4)
    inputs = batch()
    with torch.no_grad():
        expected = main_output(peft_model(**inputs))
        assert (expected - main_output(base(**inputs))).abs().max() > 1e-3
        torch.testing.assert_close(main_output(model(**inputs)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_load_peft_saved_folder(arch, tmp_path):
    base, peft_model = _peft(arch)
    peft_model.save_pretrained(tmp_path / "peft")
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    name = model.load_adapter(tmp_path / "peft", set_active=True)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(model(**inputs)), main_output(peft_model(**inputs)), atol=1e-5, rtol=0
        )
    assert name == "peft"


def test_gpt2_q_v_only_adapts_those_columns():
    model = fxadapt.AdaptedModel(make("gpt2"))
    model.add_adapter("a", LoRAConfig(r=2, init_weights="bert"))
    lora = dict(model.adapters["a"].items())["h.0.attn.c_attn"]
    delta = lora.delta_weight()
    assert delta.shape == (96, 32)
    assert delta[32:64].abs().max() == 0
    assert delta[:32].abs().min() > 0 and delta[64:].abs().min() > 0


def test_training_changes_only_the_adapter_and_lowers_loss():
    base = make("bert", head=True, initializer_range=0.2)  # a head whose logits are not all ~0
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = fxadapt.adapt(base, LoRAConfig(r=4, alpha=16, dropout=0.1), compile=False)
    adapter_before = {k: v.detach().clone() for k, v in model.adapters.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, labels = batch(8, 12, pad=0), torch.tensor([0, 1] * 4)
    losses = []
    for _ in range(30):
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for k, v in base.state_dict().items():  # the task head trains with the adapter (train_head=True)
        assert torch.equal(v, before[k]) != k.startswith("classifier."), k
    changed = [k for k, v in model.adapters.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert len(changed) == len(adapter_before)
    trains = ("adapters.", "base.classifier.")
    assert all(p.requires_grad == k.startswith(trains) for k, p in model.named_parameters())


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_merge_equals_unmerged_and_reset_restores(arch):
    base = make(arch)
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    cfg = LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v", "o"], output_lora=True, init_weights="bert")
    model = fxadapt.adapt(base, cfg, compile=False).eval()
    inputs = batch()
    with torch.no_grad():
        unmerged = main_output(model(**inputs))
        model.merge_adapter("lora")
        assert not any(n.op == "call_module" for n in model.graph_module.graph.nodes)
        merged = main_output(model(**inputs))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert any(not torch.equal(v, weights[k]) for k, v in base.state_dict().items())
    model.reset_adapter()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-7, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), unmerged, atol=0, rtol=0)


def test_adapter_management_and_summary():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", "lora")
    model.add_adapter("b", LoRAConfig(r=2))
    model.train_adapter("b")
    assert model.active_adapters == ("b",)
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["b"]["train"] and not rows["a"]["train"] and rows["b"]["active"]
    assert rows["a"]["num_params"] == 2 * 2 * (8 * 32 + 32 * 8)
    assert "Full model" in model.adapter_summary()
    assert set(k.split(".")[0] for k in model.state_dict()) == {"adapters"}  # the trainable parts
    model.delete_adapter("b")
    assert model.active_adapters is None and list(model.adapters) == ["a"]


def test_bad_input_is_refused_before_any_change():
    model = fxadapt.AdaptedModel(make("bert"))
    with pytest.raises(fxadapt.ConfigError, match="valid names: .*lora"):
        model.add_adapter("x", "loraa")
    with pytest.raises(fxadapt.ConfigError, match="r must be"):
        LoRAConfig(r=0)
    with pytest.raises(fxadapt.ConfigError, match="attn_matrices"):
        LoRAConfig(attn_matrices=["q", "z"])
    with pytest.raises(fxadapt.ConfigError, match="valid options"):
        LoRAConfig.from_dict({"r": 4, "rank": 4})
    with pytest.raises(fxadapt.ConfigError, match="use_dora"):
        LoRAConfig.from_dict({"use_dora": True})
    with pytest.raises(fxadapt.ConfigError, match="no adapter named"):
        model.set_active_adapters("nope")
    model.add_adapter("a")
    with pytest.raises(fxadapt.ConfigError, match="exists"):
        model.add_adapter("a")
    with pytest.raises(fxadapt.ConfigError, match="not merged"):
        model.reset_adapter("a")
    assert list(model.adapters) == ["a"]
