"""fxadapt -> PEFT -> fxadapt: ``save_adapter(..., format="peft")`` writes what ``PeftModel.from_pretrained``
loads with fxadapt's outputs, and fxadapt loads the same folder back to the same outputs.

The oracle is PEFT itself: each adapter is made in fxadapt with non-trivial weights, written in PEFT's
format, loaded by PEFT onto a fresh copy of the base model, and run there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, main_output, make
from peft import PeftModel

import fxadapt
from fxadapt import IA3Config, LoRAConfig, PrefixTuningFlatConfig, PromptTuningConfig

CASES = {
    "lora_bert_head": ("bert", True, LoRAConfig(r=4, alpha=8)),
    "lora_llama": ("llama", True, LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v", "o"])),
    "lora_gpt2_joint": ("gpt2", False, LoRAConfig(r=4, alpha=8, fused_qkv="joint")),
    "ia3_llama": ("llama", True, IA3Config()),
    "dora_llama": ("llama", True, "dora[formula=peft]"),  # AdapterHub's formula has no PEFT equivalent
    "vera_llama": ("llama", True, "vera[scalings=vector]"),  # PEFT's VeRA scales by vectors
    "prompt_llama": ("llama", True, PromptTuningConfig(prompt_length=3)),
    "prefix_llama": ("llama", True, PrefixTuningFlatConfig(prefix_length=3, positions="before_tokens")),
}


def _adapted(arch: str, head: bool, config) -> tuple[torch.nn.Module, fxadapt.AdaptedModel]:
    base = make(arch, head=head)
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("a", config, set_active=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.adapters["a"].parameters():
            p.add_(torch.randn_like(p) * 0.1)  # off the init, so that every tensor shows
    if head and arch == "bert":
        model.train_adapter("a")  # the classifier trains with the adapter: PEFT's modules_to_save
        with torch.no_grad():
            model.base.classifier.weight.add_(0.5)
    return base, model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fxadapt_to_peft_and_back(case, tmp_path):
    arch, head, config = CASES[case]
    base, model = _adapted(arch, head, config)
    inputs = batch(pad=0)
    with torch.no_grad():
        expected = main_output(model(**inputs))
        plain = main_output(base(**inputs))
        # the adapter does something (prompt tuning's output is longer: its real positions come last)
        assert (expected[:, -plain.shape[1] :] - plain).abs().max() > 1e-4
    model.save_adapter(tmp_path / "peft", "a", format="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = main_output(peft_model(**inputs))
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-4)
    back = fxadapt.AdaptedModel(copy.deepcopy(base))
    back.load_adapter(tmp_path / "peft", load_as="b", set_active=True)
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(back(**inputs)), expected, atol=1e-6, rtol=1e-5)


def test_peft_lora_options_that_change_the_math(tmp_path):
    """PEFT's rsLoRA scaling, per-module ranks and alphas and a subset of layers, read from its folder."""
    from peft import LoraConfig, get_peft_model

    base = make("llama", head=True)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 32},
        layers_to_transform=[1],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.load_adapter(tmp_path / "peft", load_as="p", set_active=True)
    model.eval()
    assert sorted(model.adapters["p"].site_keys) == sorted(
        f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(model(**inputs)), main_output(peft_model(**inputs)), atol=1e-5, rtol=1e-4
        )
