"""generate() with PEFT's prefix tuning: the HF model generating from the prefix as its initial cache.

PEFT's prefix tuning hands its keys and values to the model as ``past_key_values`` and extends the
attention mask; under transformers 5 (which calls the argument ``cache``) PEFT 0.21's ``generate``
drops them, so its tokens are the base model's (``test_peft_prefix_generate_drops_the_prefix``). The
oracle is what PEFT means: transformers' ``generate`` given PEFT's prefix cache, so the real tokens
are numbered after the prefix (fxadapt's ``positions="before_tokens"``) and every step sees it.
"""

from __future__ import annotations

import copy

import torch
from peft import PrefixTuningConfig, get_peft_model
from test_generate import lm, prompts

import fxadapt

P = 3
KW = dict(max_new_tokens=6, do_sample=False)


def _peft_prefix(tmp_path):
    base = lm("llama")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.load_adapter(tmp_path, load_as="p", set_active=True)
    return base, peft_model, model.eval()


def _from_prefix_cache(base, peft_model, inputs):
    """transformers' generate with PEFT's prefix keys and values as the initial cache, mask extended."""
    b = inputs["input_ids"].shape[0]
    mask = inputs["attention_mask"]
    with torch.no_grad():
        return base.generate(
            input_ids=inputs["input_ids"],
            attention_mask=torch.cat([mask.new_ones(b, P), mask], 1),
            past_key_values=peft_model.get_prompt(batch_size=b),
            **KW,
        )


def test_peft_prefix_greedy_equals_hf_generate_from_the_prefix_cache(tmp_path):
    base, peft_model, model = _peft_prefix(tmp_path)
    assert model.adapters["p"].config.positions == "before_tokens"
    for inputs in (prompts(), prompts(1, 5)):
        expected = _from_prefix_cache(base, peft_model, inputs)
        with torch.no_grad():
            assert not torch.equal(expected, base.generate(**inputs, **KW))  # the prefix changes the tokens
        assert torch.equal(model.generate(**inputs, **KW), expected)


def test_peft_prefix_generate_drops_the_prefix(tmp_path):
    """Why PEFT's own generate is not the oracle here: its forward sees the prefix, its generate does not."""
    base, peft_model, model = _peft_prefix(tmp_path)
    inputs = prompts(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, peft_model(**inputs).logits, atol=1e-5, rtol=0)
        assert torch.equal(peft_model.generate(**inputs, **KW), base.generate(**inputs, **KW))


def test_prefix_outputs_and_gradients_equal_peft(tmp_path):
    """The layers' prefixes are split off before the batch is expanded (issue 13): outputs and the
    gradient of the prefix itself still equal PEFT's, whose prefix is one ``[P, 2·layers·W]`` table."""
    base, peft_model, model = _peft_prefix(tmp_path)
    peft_model.train()
    model.train_adapter("p")
    inputs = prompts(2, 5)
    mine, theirs = model(**inputs).logits, peft_model(**inputs).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    mine.square().mean().backward()
    theirs.square().mean().backward()
    (table,) = [p for p in model.adapters["p"].parameters() if p.requires_grad]
    expected = peft_model.prompt_encoder["default"].embedding.weight.grad
    assert expected is not None and expected.abs().max() > 0
    torch.testing.assert_close(table.grad.reshape(expected.shape), expected, atol=1e-6, rtol=1e-5)
