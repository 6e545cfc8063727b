"""(IA)^3 against its oracles: identity at init, PEFT with the same vectors, merge == unmerged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, main_output, make
from peft import IA3Config as PeftIA3Config
from peft import get_peft_model

import fxadapt
from fxadapt import IA3Config
from fxadapt.heads.static import task_head


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_identity_at_init_and_default_sites(arch):
    base = make(arch).eval()
    model = fxadapt.adapt(copy.deepcopy(base), "ia3", compile=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(model(**batch())), main_output(base(**batch())), atol=1e-6, rtol=0
        )
    roles = {r for k in model.adapters["ia3"].site_keys for r in model.sites().by_key()[k].roles}
    assert {"k", "v", "ffn_in"} <= roles


def test_same_vectors_as_peft_give_same_outputs():
    base = make("bert").eval()
    peft_model = get_peft_model(
        copy.deepcopy(base),
        PeftIA3Config(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=[]),
    ).eval()
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("x", "ia3", set_active=True)
    model.eval()
    peft_modules = dict(peft_model.base_model.model.named_modules())
    torch.manual_seed(0)
    for key, module in model.adapters["x"].items():
        vec = torch.rand_like(peft_modules[key].ia3_l["default"]) + 0.5
        with torch.no_grad():
            peft_modules[key].ia3_l["default"].copy_(vec)
            module.lora_B.copy_(vec.reshape(-1, 1))
    with torch.no_grad():
        expected = main_output(peft_model(**batch()))
        assert (expected - main_output(base(**batch()))).abs().max() > 1e-3
        torch.testing.assert_close(main_output(model(**batch())), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_scales_weight_and_bias_and_reset_restores(arch):
    base = make(arch)
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = fxadapt.adapt(base, IA3Config(init_weights="bert", alpha=40), compile=False).eval()
    with torch.no_grad():
        unmerged = main_output(model(**batch()))
        model.merge_adapter("ia3")
        merged = main_output(model(**batch()))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    model.reset_adapter()
    for k, v in base.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_gpt2_fused_scale_leaves_other_columns_alone():
    model = fxadapt.AdaptedModel(make("gpt2"))
    model.add_adapter("x", IA3Config(init_weights="bert"))
    vec = dict(model.adapters["x"].items())["h.0.attn.c_attn"].vector()
    assert vec.shape == (96,)
    assert torch.equal(vec[:32], torch.ones(32))
    assert not torch.equal(vec[32:], torch.ones(64))


def test_training_lowers_loss_and_leaves_base_alone():
    base = make("bert", head=True, initializer_range=0.2)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = fxadapt.adapt(base, "ia3", compile=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    inputs, labels = batch(8, 12, pad=0), torch.tensor([0, 1] * 4)
    losses = []
    for _ in range(20):
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    head = set(task_head(base))
    for k, v in base.state_dict().items():
        assert k in head or torch.equal(v, before[k]), k  # a static task head trains too


def test_scale_mode_needs_rank_one():
    with pytest.raises(fxadapt.ConfigError, match="r must be 1"):
        IA3Config(r=2)
