"""generate(): against PEFT's and the HF model's own generate, and against fxadapt's own uncached forward.

Oracles: greedy tokens equal PEFT's ``generate`` with the same weights and the HF model's ``generate``
after ``merge_adapter`` (left-padded batches of different prompt lengths, and batch 1); prompt tuning
equals the HF model's ``generate`` from the prompt's embeddings (PEFT 0.21's prompt-tuning ``generate``
re-injects the prompt at every step under transformers 5, see ``test_peft_prompt_tuning_reinjects``);
the logits of every decode step equal the full-sequence forward (teacher forcing); seeded sampling
equals PEFT's. Models are tiny and eager except in ``test_compiled_*``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import BART, GPT2, LLAMA
from peft import IA3Config as PeftIA3Config
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.generation.streamers import BaseStreamer

import fxadapt
from fxadapt import ConfigError
from fxadapt.generation.capture import mask_positions

SPREAD = dict(initializer_range=0.3)  # well separated logits: greedy tokens do not hinge on rounding
TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
}


def lm(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**GPT2, **SPREAD)).eval()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**LLAMA, **SPREAD)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**LLAMA, **SPREAD)).eval()
    if arch == "bart":
        cfg = BartConfig(
            **BART, init_std=0.3, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2
        )
        return BartForConditionalGeneration(cfg).eval()
    if arch == "t5":
        cfg = T5Config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            vocab_size=100,
            initializer_factor=3.0,
            decoder_start_token_id=0,
        )
        return T5ForConditionalGeneration(cfg).eval()
    raise ValueError(arch)


def prompts(batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    """A left-padded batch whose rows have different lengths (or one unpadded row)."""
    g = torch.Generator().manual_seed(batch * 10 + length)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return {"input_ids": ids, "attention_mask": mask}


def encoder_prompts(batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    """An encoder-decoder's batch: right-padded sources of different lengths."""
    inputs = prompts(batch, length)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    inputs["input_ids"] = inputs["input_ids"].flip(1)
    return inputs


def _randomize(model: fxadapt.AdaptedModel, name: str, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _generated_captures(model: fxadapt.AdaptedModel) -> list:
    return [sig for sig in model._captures if sig[0] == "generate"]


def _peft_lora(arch: str, folder: str):
    base = lm(arch)
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(folder)
    return base, peft_model


# ---- greedy: PEFT, and the HF model after merging --------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "bart"])
def test_lora_greedy_equals_peft_and_merged_equals_hf(arch, tmp_path):
    base, peft_model = _peft_lora(arch, str(tmp_path / "peft"))
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    name = model.load_adapter(tmp_path / "peft", set_active=True)
    model.eval()
    seq2seq = arch == "bart"
    batches = [encoder_prompts() if seq2seq else prompts(), prompts(1, 5)]
    kw = dict(max_new_tokens=8, do_sample=False)
    expected = []
    for inputs in batches:
        with torch.no_grad():
            expected.append(peft_model.generate(**inputs, **kw))
            unadapted = base.generate(**inputs, **kw)
        got = model.generate(**inputs, **kw)
        assert torch.equal(got, expected[-1])
        assert not torch.equal(got, unadapted)  # the adapter changes the tokens
    model.merge_adapter(name)
    for inputs, tokens in zip(batches, expected):
        with torch.no_grad():
            hf = model.base.generate(**inputs, **kw)  # the HF model's own generate, merged weights
        assert torch.equal(model.generate(**inputs, **kw), hf)
        assert torch.equal(hf, tokens)


def test_ia3_greedy_equals_peft():
    base = lm("llama")
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("ia3", "ia3", set_active=True)
    model.eval()
    keys = model.adapters["ia3"].site_keys
    peft_model = get_peft_model(
        copy.deepcopy(base), PeftIA3Config(target_modules=keys, feedforward_modules=[])
    ).eval()
    peft_modules = dict(peft_model.base_model.model.named_modules())
    g = torch.Generator().manual_seed(0)
    for key, module in model.adapters["ia3"].items():
        vec = torch.rand(peft_modules[key].ia3_l["default"].shape, generator=g) + 0.5
        with torch.no_grad():
            peft_modules[key].ia3_l["default"].copy_(vec)
            module.lora_B.copy_(vec.reshape(-1, 1))
    for inputs in (prompts(), prompts(1, 5)):
        with torch.no_grad():
            expected = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)
            assert not torch.equal(expected, base.generate(**inputs, max_new_tokens=8, do_sample=False))
        assert torch.equal(model.generate(**inputs, max_new_tokens=8), expected)


def _prompt_tuned(base: torch.nn.Module) -> fxadapt.AdaptedModel:
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("p", fxadapt.PromptTuningConfig(prompt_length=4), set_active=True)
    _randomize(model, "p", 1.0)
    return model.eval()


def test_prompt_tuning_equals_hf_generate_from_the_prompt_embeddings():
    """What PEFT's prompt tuning feeds ``generate``: ``[prompt; embeddings]`` with the mask extended."""
    base = lm("llama")
    model = _prompt_tuned(base)
    prompt = model.adapters["p"].layers["prompt_tuning"].prompt_embedding.weight
    for inputs in (prompts(), prompts(1, 5)):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = torch.cat([prompt.expand(len(ids), -1, -1), base.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(len(ids), 4, dtype=mask.dtype), mask], 1)
        with torch.no_grad():
            expected = base.generate(
                inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=8, do_sample=False
            )
        got = model.generate(**inputs, max_new_tokens=8)
        assert torch.equal(got[:, ids.shape[1] :], expected)


def test_peft_prompt_tuning_reinjects():
    """Why PEFT is not the oracle for prompt tuning here: its first token is ours, its later steps feed the
    prompt again (PEFT 0.21 looks for ``past_key_values``, which transformers 5 calls ``cache``)."""
    base = lm("llama")
    model = _prompt_tuned(base)
    peft_model = get_peft_model(
        copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(
            model.adapters["p"].layers["prompt_tuning"].prompt_embedding.weight
        )
    peft_model.eval()
    inputs = prompts(1, 5)
    lengths = []
    hook = peft_model.base_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        first = peft_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hook.remove()
    assert lengths == [4 + 5, 4 + 1, 4 + 1]  # the prompt goes in again at every step
    assert torch.equal(model.generate(**inputs, max_new_tokens=1), first[:, :6])


# ---- teacher forcing: every step's logits equal the uncached forward --------------------------------
def _teacher_forced_error(model, inputs, seq2seq=False, new=6):
    out = model.generate(
        **inputs, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True, output_logits=True
    )
    steps = torch.stack(out.logits, 1)
    seq = out.sequences
    with torch.no_grad():
        if seq2seq:
            full = model(**inputs, decoder_input_ids=seq[:, :-1]).logits
        else:
            mask = torch.cat(
                [inputs["attention_mask"], torch.ones_like(seq[:, inputs["input_ids"].shape[1] : -1])], 1
            )
            positions = (
                {} if mask.all() else {"position_ids": mask_positions(mask)}
            )  # generate's, with padding
            full = model(input_ids=seq[:, :-1], attention_mask=mask, **positions).logits
    full = full[:, -steps.shape[1] :]
    return (
        (full - steps).abs().max() / full.abs().max().clamp_min(1.0)
    ).item()  # relative to the logits' scale


CACHED = [
    "prefix_tuning[prefix_length=3]",
    "prefix_tuning_flat[prefix_length=2]",
    "seq_bn",
    "par_bn",
    "double_seq_bn",
    "compacter[reduction_factor=4]",
    "seq_bn_inv",
    "loreft",
    "direft[prefix_positions=2]",
    "mam[prefix_length=3]",
    "lora|seq_bn",
]


@functools.cache
def _shared(arch: str) -> fxadapt.AdaptedModel:
    """One model per architecture for the teacher-forcing tests: its captures serve every adapter."""
    return fxadapt.AdaptedModel(lm(arch)).eval()


def _with(arch: str, config: str) -> fxadapt.AdaptedModel:
    model = _shared(arch)
    model.add_adapter("x", config, overwrite_ok=True, set_active=True)
    _randomize(model, "x")
    return model.eval()


@pytest.mark.parametrize("config", CACHED)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_steps_equal_the_full_forward(arch, config):
    if arch == "gpt2" and config.startswith(
        ("par_bn", "double", "compacter", "lora|", "direft", "prefix_tuning_flat")
    ):
        pytest.skip("covered on llama")
    model = _with(arch, config)
    assert _teacher_forced_error(model, prompts()) < 1e-5


@pytest.mark.parametrize(
    "config", ["prefix_tuning[prefix_length=3]", "seq_bn", "lora", "mam[prefix_length=3]"]
)
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_encoder_decoder_decode_steps_equal_the_full_forward(arch, config):
    """Encoder once, decoder with self- and cross-attention caches; prefix keys reach the cached cross-attention."""
    if arch == "t5" and config in ("seq_bn", "mam[prefix_length=3]"):
        pytest.skip("covered on bart")
    model = _with(arch, config)
    # T5 does not scale its attention scores: float32 rounding reaches 1e-5 of the logits' scale
    assert _teacher_forced_error(model, encoder_prompts(), seq2seq=True) < 5e-5


def test_prompt_tuning_positions_are_in_the_prefill_only():
    """GPT-2 adds position embeddings before the prompt's insertion point, Llama rotates in the layers:
    both continue as their uncached forward does."""
    for arch in ("llama", "gpt2"):
        model = _with(arch, "prompt_tuning[prompt_length=3]")
        inputs = prompts(2, 6)
        inputs["attention_mask"][:] = 1  # the uncached forward numbers positions from the first token
        assert _teacher_forced_error(model, inputs) < 1e-5


def test_reft_intervenes_on_prompt_positions_only():
    """ReFT's suffix positions are the prompt's last tokens: the first token is the prompt's forward."""
    model = _with("llama", "loreft[prefix_positions=1,suffix_positions=2]")
    inputs = prompts()
    out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        full = model(**inputs, position_ids=mask_positions(inputs["attention_mask"])).logits[:, -1]
    torch.testing.assert_close(out.logits[0], full, atol=1e-5, rtol=0)


# ---- generation options ----------------------------------------------------------------------------
class _Collect(BaseStreamer):
    def __init__(self) -> None:
        self.puts, self.ended = [], False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True


def test_options_scores_and_streamer_equal_peft(tmp_path):
    base, peft_model = _peft_lora("llama", str(tmp_path / "peft"))
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.load_adapter(tmp_path / "peft", set_active=True)
    model.eval()
    inputs = prompts(1, 6)
    with torch.no_grad():
        first = peft_model.generate(**inputs, max_new_tokens=6, do_sample=False, repetition_penalty=1.5)
    eos = [int(first[0, 8]), 99]  # the third new token ends the single row
    kw = dict(
        max_new_tokens=10,
        min_new_tokens=2,
        repetition_penalty=1.5,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    lengths = []
    for inputs in (prompts(1, 6), prompts()):
        ours, theirs = _Collect(), _Collect()
        with torch.no_grad():
            expected = peft_model.generate(**inputs, **kw, streamer=theirs)
        got = model.generate(**inputs, **kw, streamer=ours)
        assert torch.equal(got.sequences, expected.sequences)
        assert len(got.scores) == len(expected.scores) and len(got.logits) == len(expected.logits)
        for a, b in zip(got.scores + got.logits, expected.scores + expected.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert ours.ended and len(ours.puts) == len(theirs.puts)
        assert all(torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts))
        lengths.append(got.sequences.shape[1] - inputs["input_ids"].shape[1])
    assert lengths[0] == 3  # the single row stopped at its eos


def test_sampling_is_reproducible_and_equals_peft(tmp_path):
    base, peft_model = _peft_lora("llama", str(tmp_path / "peft"))
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.load_adapter(tmp_path / "peft", set_active=True)
    model.eval()
    inputs = prompts()
    kw = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, max_new_tokens=10)
    one = model.generate(**inputs, **kw, generator=torch.Generator().manual_seed(5))
    two = model.generate(**inputs, **kw, generator=torch.Generator().manual_seed(5))
    other = model.generate(**inputs, **kw, generator=torch.Generator().manual_seed(6))
    assert torch.equal(one, two) and not torch.equal(one, other)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = peft_model.generate(**inputs, **kw)
    torch.manual_seed(7)
    assert torch.equal(model.generate(**inputs, **kw), expected)
    torch.manual_seed(8)
    sampled = model.generate(**inputs, **kw, num_return_sequences=2)
    torch.manual_seed(8)
    with torch.no_grad():
        assert torch.equal(sampled, peft_model.generate(**inputs, **kw, num_return_sequences=2))


# ---- compiled decoding -----------------------------------------------------------------------------
def test_compiled_decoding_compiles_once_for_every_batch_length_and_step():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def decode_graphs() -> int:
        return sum(
            any("cache_position" in n.name for n in g.graph.nodes if n.op == "placeholder") for g in graphs
        )

    torch._dynamo.reset()
    model = fxadapt.adapt(lm("llama"), "lora", compile_options={"backend": counting_backend}).eval()
    model.generate(**prompts(2, 5), max_new_tokens=3)
    assert len(graphs) == 2 and decode_graphs() == 1  # prefill and decode, each one graph: no break
    model.generate(**prompts(1, 6), max_new_tokens=3)  # a batch of 1 specialises the prefill's lm head once
    warm = len(graphs)
    for b, s, n in [(3, 9, 4), (1, 4, 64), (4, 3, 2), (2, 12, 20)]:
        model.generate(**prompts(b, s), max_new_tokens=n, min_new_tokens=n)
    assert len(graphs) == warm <= 3
    assert decode_graphs() == 1


def test_compiled_generation_equals_eager():
    torch._dynamo.reset()
    base = lm("llama")
    eager = fxadapt.adapt(copy.deepcopy(base), "lora", compile=False).eval()
    _randomize(eager, "lora")
    compiled = fxadapt.adapt(base, "lora").eval()
    compiled.adapters.load_state_dict(eager.adapters.state_dict())
    for inputs in (prompts(), prompts(1, 5)):
        assert torch.equal(
            compiled.generate(**inputs, max_new_tokens=6), eager.generate(**inputs, max_new_tokens=6)
        )


# ---- bad input: a clear error before anything runs -------------------------------------------------
def test_bad_input_is_refused_before_anything_runs():
    encoder_only = fxadapt.AdaptedModel(
        BertModel(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=100,
            )
        )
    )
    with pytest.raises(ConfigError, match="cannot generate"):
        encoder_only.generate(**prompts())
    model = _with("llama", "lora")
    before = list(_generated_captures(model))
    cases = [
        (dict(max_new_tokens=4, num_beams=2), "num_beams"),
        (dict(max_new_tokens=4, penalty_alpha=0.5, top_k=4), "penalty_alpha"),
        (dict(max_new_tokens=4, output_attentions=True), "output_attentions"),
        (dict(max_new_tokens=4, assistant_model=model), "assistant_model"),
        (
            dict(max_new_tokens=4, cache_config={"max_cache_len": 5}),
            "the prompt has 7 tokens but the cache holds 5",
        ),
        (dict(max_new_tokens=8, cache_config={"max_cache_len": 10}), "max_cache_len"),
        (dict(max_new_tokens=4, max_lenght=4), "max_lenght"),
        (dict(max_new_tokens=4, cache_implementation="offloaded"), "cache_implementation"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            model.generate(**prompts(), **kwargs)
    right = prompts()
    right["attention_mask"] = right["attention_mask"].flip(1)
    with pytest.raises(ConfigError, match="pad on the left"):
        model.generate(**right, max_new_tokens=4)
    with pytest.raises(ConfigError, match="input_ids"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=4)
    seq2seq = _with("bart", "seq_bn_inv")
    with pytest.raises(ConfigError, match="invertible"):
        seq2seq.generate(**encoder_prompts(), max_new_tokens=4)
    assert _generated_captures(model) == before  # nothing was captured or run
