"""Prefix tuning and prompt tuning: AdapterHub's cases, PEFT, masks, shapes, eject, training, files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BART, GPT2, batch, compiled_graph_count, main_output, make
from peft import PromptTuningConfig as PeftPromptTuningConfig
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

import fxadapt
from fxadapt import PrefixTuningConfig, PrefixTuningFlatConfig, PromptTuningConfig
from fxadapt.heads.static import task_head
from passes.attention import attention_layers

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
ARCHS = ["bert", "gpt2", "llama", "bart"]
PREFIX = PrefixTuningConfig(prefix_length=5, bottleneck_size=16)
PROMPT = PromptTuningConfig(prompt_length=4)


def _randomize(model: fxadapt.AdaptedModel, name: str, seed: int = 0) -> None:
    """Random non-identity adapter weights, so a wrong placement shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _adapted(arch: str, config, impl: str = "sdpa", **kw) -> fxadapt.AdaptedModel:
    model = fxadapt.AdaptedModel(make(arch, attn_implementation=impl, **kw))
    model.add_adapter("a", config, set_active=True)
    _randomize(model, "a")
    return model.eval()


def _run(model, inputs: dict) -> torch.Tensor:
    inputs = dict(inputs)
    if model.config.is_encoder_decoder and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5].clone()
    with torch.no_grad():
        return main_output(model(**inputs))


# ---- AdapterHub's cases, also under SDPA (test_adapterhub.py runs them eagerly) --------------------
@pytest.mark.parametrize(
    "case", ["bert__prefix_tuning", "gpt2__prefix_tuning", "llama__prefix_tuning", "bert__prompt_tuning"]
)
def test_adapterhub_cases_under_sdpa(case):
    folder = FIXTURES / case
    meta = json.loads((folder / "case.json").read_text())
    io = load_file(str(folder / "io.safetensors"))
    inputs = {k[len("input.") :]: v for k, v in io.items() if k.startswith("input.")}
    model = fxadapt.AdaptedModel(AutoModel.from_pretrained(folder / "base", attn_implementation="sdpa"))
    model.load_adapter(folder / "adapter", set_active=True)
    model.eval()
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    torch.testing.assert_close(out, io["expected.last_hidden_state"], atol=meta["atol"], rtol=0)


def test_adapterhub_prefix_keys_map_onto_one_module_per_location():
    folder = FIXTURES / "llama__prefix_tuning"
    model = fxadapt.AdaptedModel(AutoModel.from_pretrained(folder / "base"))
    model.load_adapter(folder / "adapter", set_active=True)
    adapter = model.adapters["a"]
    assert adapter.site_keys == ["layers.0.self_attn.k_proj"]
    (module,) = adapter.layers.values()
    # Llama's 2 kv heads of width 8: 2 layers x (key, value) x 16 values per prefix position
    assert module.control_trans[2].weight.shape == (64, 512) and module.n_layers == 2


# ---- PEFT: same prompt, same outputs ---------------------------------------------------------------
def test_prompt_tuning_matches_peft():
    base = make("llama", head=True).eval()
    peft_model = get_peft_model(
        copy.deepcopy(base), PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("p", PROMPT, set_active=True)
    _randomize(model, "p")
    model.eval()
    weight = model.adapters["p"].layers["prompt_tuning"].prompt_embedding.weight
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(weight)
    inputs = batch()
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        expected = peft_model(**inputs, labels=labels)
        got = model(**inputs, labels=labels)
    assert got.logits.shape == expected.logits.shape == (2, 4 + 9, 100)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


# ---- masks and shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_padded_rows_equal_rows_run_alone_for_two_shapes(arch, impl, method):
    model = _adapted(arch, PREFIX if method == "prefix" else PROMPT, impl)
    extra = 4 if method == "prompt" and arch != "bart" else 0  # BART's output is the decoder's
    for b, s, pad in [(3, 9, 3), (2, 6, 2)]:
        inputs = batch(b, s, pad)
        out = _run(model, inputs)
        assert out.shape[:2] == (b, (5 if arch == "bart" else s) + extra)
        for r in range(b):
            n = s - (pad if r == b - 1 else 0)
            alone = _run(model, {k: v[r : r + 1, :n] for k, v in inputs.items()})
            width = alone.shape[1]
            torch.testing.assert_close(out[r : r + 1, :width], alone, atol=2e-5, rtol=0)
    dec = {"decoder_input_ids": torch.ones(2, 3, dtype=torch.long)} if arch == "bart" else {}
    assert len({id(model.graph_for(**batch(b, s), **dec)) for b, s in [(3, 9), (2, 6), (4, 11)]}) == 1


def test_prefix_changes_outputs_and_leave_out_keeps_a_layer():
    base = make("bert").eval()
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("a", PrefixTuningConfig(prefix_length=3, leave_out=[0]), set_active=True)
    model.eval()
    (module,) = model.adapters["a"].layers.values()
    assert module.slots == (None, 0) and module.n_layers == 1
    inputs = batch()
    with torch.no_grad():
        ours = model(**inputs, output_hidden_states=True).hidden_states
        ref = base(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ours[1], ref[1], atol=1e-6, rtol=0)  # layer 0 has no prefix
    assert (ours[2] - ref[2]).abs().max() > 1e-3


class _CausalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (m(x).view(b, s, 2, 4).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(a.transpose(1, 2).reshape(b, s, 8))


class _Causal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_CausalBlock()])

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](inputs_embeds)


def test_sdpa_is_causal_without_mask_gets_an_explicit_mask():
    torch.manual_seed(0)
    net = _Causal().eval()
    x = torch.randn(2, 6, 8)
    model = fxadapt.AdaptedModel(net, example_inputs={"inputs_embeds": x})
    model.add_adapter("a", PrefixTuningConfig(prefix_length=3, bottleneck_size=4), set_active=True)
    model.eval()
    (module,) = model.adapters["a"].layers.values()
    with torch.no_grad():
        got = model(inputs_embeds=x)
        kv = module.values()  # [P, 2, 8]
        blk = net.blocks[0]
        q, k, v = (m(x).view(2, 6, 2, 4).transpose(1, 2) for m in (blk.q, blk.k, blk.v))
        pk, pv = (kv[:, i].reshape(3, 2, 4).transpose(0, 1).expand(2, -1, -1, -1) for i in (0, 1))
        mask = torch.cat([torch.ones(6, 3, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool).tril()], 1)
        a = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)
        expected = x + blk.o(a.transpose(1, 2).reshape(2, 6, 8))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    node = next(n for n in model.graph_for(inputs_embeds=x).graph.nodes if "scaled_dot" in str(n.target))
    assert node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False) is False


def test_bart_locations_and_gqa_widths():
    bart = {
        a.key: (a.location, a.position, a.layer) for a in attention_layers(_adapted("bart", PREFIX).sites())
    }
    assert bart == {
        "encoder.layers.0.self_attn.k_proj": ("encoder", 0, 0),
        "decoder.layers.0.self_attn.k_proj": ("self", 0, 1),
        "decoder.layers.0.encoder_attn.k_proj": ("cross", 0, 1),
    }
    model = _adapted("bart", PrefixTuningConfig(prefix_length=2, encoder_prefix=False, cross_prefix=False))
    assert model.adapters["a"].site_keys == ["decoder.layers.0.self_attn.k_proj"]
    llama = attention_layers(_adapted("llama", PREFIX).sites())
    assert [a.width for a in llama] == [16, 16]


def test_gating_with_open_gates_equals_no_gating():
    plain = _adapted("gpt2", PREFIX, "eager")
    gated = fxadapt.AdaptedModel(copy.deepcopy(plain.base))
    gated.add_adapter("a", PREFIX.replace(use_gating=True, shared_gating=False), set_active=True)
    gated.eval()
    state = {k: v for k, v in plain.adapters["a"].state_dict().items()}
    missing = gated.adapters["a"].load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == [
        f"layers.h__0__attn__c_attn.gates.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")
    ]
    with torch.no_grad():
        for gate in gated.adapters["a"].layers["h__0__attn__c_attn"].gates.values():
            gate.weight.zero_()
            gate.bias.fill_(30.0)
    torch.testing.assert_close(_run(gated, batch()), _run(plain, batch()), atol=1e-5, rtol=0)


# ---- eject -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_eject_keeps_outputs_with_fewer_parameters(arch, tmp_path):
    model = _adapted(arch, PrefixTuningConfig(prefix_length=4, bottleneck_size=32, leave_out=[1]))
    before = _run(model, batch())
    params = model.adapters["a"].num_parameters()
    model.eject_prefix_tuning("a")
    adapter = model.adapters["a"]
    assert isinstance(adapter.config, PrefixTuningFlatConfig) and adapter.method.name == "prefix_tuning_flat"
    assert adapter.num_parameters() < params
    torch.testing.assert_close(_run(model, batch()), before, atol=1e-5, rtol=0)
    model.save_adapter(tmp_path, "a")
    other = fxadapt.AdaptedModel(copy.deepcopy(model.base))
    other.load_adapter(tmp_path, set_active=True)
    other.eval()
    assert other.adapters["a"].method.name == "prefix_tuning_flat"
    torch.testing.assert_close(_run(other, batch()), before, atol=1e-5, rtol=0)


def test_eject_refuses_other_methods():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("l", "lora")
    with pytest.raises(fxadapt.ConfigError, match="not prefix tuning"):
        model.eject_prefix_tuning("l")


# ---- training --------------------------------------------------------------------------------------
def _lm(arch: str) -> nn.Module:
    """A model with a loss, initialised wide enough (std 0.2) that a prefix or prompt can move it."""
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**GPT2, initializer_range=0.2))
    if arch == "bart":
        return BartForConditionalGeneration(BartConfig(**BART, init_std=0.2))
    return make(arch, head=True, initializer_range=0.2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", [PrefixTuningConfig(prefix_length=4, bottleneck_size=16), PROMPT], ids=str)
def test_training_lowers_loss_and_leaves_base_alone(arch, config):
    base = _lm(arch)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = fxadapt.adapt(base, config, compile=False)
    for p in task_head(base).values():  # the prefix or prompt alone must move the loss
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    inputs = batch(4, 8, pad=2)
    labels = torch.tensor([0, 1, 1, 0]) if arch == "bert" else inputs["input_ids"].clone()
    if arch == "bart":  # the decoder reads its own tokens (BART's shift of labels does not capture)
        inputs["decoder_input_ids"], labels = labels[:, :6].clone(), labels[:, 1:7].clone()
    losses = []
    for _ in range(20):
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0]  # measured: 0.48-0.84 of the first loss, BART's prompt 0.95
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- compile: no graph breaks ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "config", [PrefixTuningConfig(prefix_length=3, dropout=0.1, leave_out=[1]), PROMPT], ids=str
)
def test_zero_graph_breaks(arch, training, config):
    assert compiled_graph_count(arch, config, training) == 1


# ---- files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        PrefixTuningConfig(prefix_length=3, bottleneck_size=8, use_gating=True),
        PrefixTuningFlatConfig(prefix_length=3),
        PromptTuningConfig(prompt_length=3, combine="prefix_after_bos"),
    ],
    ids=str,
)
def test_save_load_roundtrip_is_bitwise(config, tmp_path):
    model = _adapted("llama", config)
    expected = _run(model, batch())
    model.save_adapter(tmp_path, "a")
    other = fxadapt.AdaptedModel(copy.deepcopy(model.base))
    other.load_adapter(tmp_path, set_active=True)
    other.eval()
    saved, loaded = model.adapters["a"].state_dict(), other.adapters["a"].state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert other.adapters["a"].config == model.adapters["a"].config
    assert torch.equal(_run(other, batch()), expected)


def test_prompt_from_string_takes_the_token_embeddings():
    base = make("bert")
    table = base.get_input_embeddings()
    config = PromptTuningConfig(
        prompt_length=5, prompt_init="from_string", prompt_init_text=[7, 8], embeddings=table
    )
    model = fxadapt.AdaptedModel(base)
    model.add_adapter("p", config)
    weight = model.adapters["p"].layers["prompt_tuning"].prompt_embedding.weight
    assert torch.equal(weight, table.weight[[7, 8, 7, 8, 7]])

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [3, 4, 5]}

    by_text = config.replace(prompt_init_text="hi", tokenizer=Tokenizer(), prompt_length=2)
    model.add_adapter("q", by_text)
    assert torch.equal(
        model.adapters["q"].layers["prompt_tuning"].prompt_embedding.weight, table.weight[[3, 4]]
    )
    assert "tokenizer" not in by_text.to_dict() and "embeddings" not in by_text.to_dict()


# ---- bad configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda: PrefixTuningConfig(prefix_length=0), "prefix_length"),
        (lambda: PrefixTuningConfig(bottleneck_size=2.5), "bottleneck_size"),
        (lambda: PrefixTuningConfig(non_linearity="nope"), "non_linearity"),
        (lambda: PrefixTuningConfig(dropout=1.0), "dropout"),
        (lambda: PrefixTuningConfig(leave_out=["0"]), "leave_out"),
        (lambda: PrefixTuningConfig(flat="yes"), "flat"),
        (lambda: PrefixTuningFlatConfig(flat=False), "flat must be True"),
        (lambda: PrefixTuningConfig.from_dict({"prefix_len": 3}), "valid options"),
        (lambda: PrefixTuningConfig.from_dict({"init_weights_seed": 3}), "init_weights_seed"),
        (lambda: PromptTuningConfig(prompt_length=-1), "prompt_length"),
        (lambda: PromptTuningConfig(combine="suffix"), "combine"),
        (lambda: PromptTuningConfig(prompt_init="zeros"), "prompt_init"),
        (lambda: PromptTuningConfig(prompt_init="from_string"), "prompt_init_text"),
        (lambda: PromptTuningConfig(prompt_init="from_string", prompt_init_text="hi"), "tokenizer"),
        (lambda: PromptTuningConfig(prompt_init="from_string", prompt_init_text=[1]), "embeddings"),
    ],
)
def test_bad_config_values_raise(make_config, message):
    with pytest.raises(fxadapt.ConfigError, match=message):
        make_config()


def test_bad_adapters_leave_the_model_unchanged():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("keep", PREFIX)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxadapt.ConfigError, match="no attention layer"):
        model.add_adapter("x", PrefixTuningConfig(leave_out=[0, 1]))
    table = torch.zeros(100, 16)  # the wrong width
    with pytest.raises(fxadapt.ConfigError, match="width"):
        model.add_adapter(
            "y", PromptTuningConfig(prompt_init="from_string", prompt_init_text=[1], embeddings=table)
        )
    with pytest.raises(fxadapt.ConfigError, match="outside the embedding table"):
        PromptTuningConfig(prompt_init="from_string", prompt_init_text=[500], embeddings=torch.zeros(100, 32))
    assert list(model.adapters) == ["keep"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {"prefix_tuning", "prefix_tuning_flat", "prompt_tuning"} <= set(fxadapt.method_names())


def test_adapterhub_names_for_every_location():
    from fxadapt.methods.prefix_tuning import adapterhub_key
    from fxadapt.methods.prompt_tuning import adapterhub_key as prompt_key

    sites = fxadapt.AdaptedModel(make("bart")).sites()
    pool = "prefix_tuning.pool.prefix_tunings.a"
    cases = {
        f"encoder.layers.0.self_attn.{pool}.encoder_prefix.wte.weight": "encoder.layers.0.self_attn.k_proj.wte.weight",
        f"decoder.layers.0.self_attn.{pool}.self_prefix.control_trans": "decoder.layers.0.self_attn.k_proj.control_trans",
        "prefix_tuning.prefix_tunings.a.cross_prefix.control_trans.2.bias": (
            "decoder.layers.0.encoder_attn.k_proj.control_trans.2.bias"
        ),
        "decoder.layers.0.encoder_attn.prefix_tuning.prefix_gates.a.weight": (
            "decoder.layers.0.encoder_attn.k_proj.gates.0.weight"
        ),
    }
    for theirs, ours in cases.items():
        assert adapterhub_key(theirs, sites) == ours
    assert adapterhub_key("encoder.layers.0.fc1.loras.a.lora_A", sites) is None
    assert prompt_key("prompt_tuning.prompt_tunings.a.prompt_embedding.weight", sites) == (
        "prompt_tuning.prompt_embedding.weight"
    )


def _matrix_model(name: str, **options) -> tuple[nn.Module, dict]:
    import dataclasses

    from architectures import ARCHS, inputs

    arch = next(a for a in ARCHS if a.name == name)
    arch = dataclasses.replace(arch, options={**arch.options, **options})
    base = arch.build()
    return base, inputs(arch, base)


def test_prompt_tuning_on_a_fixed_patch_sequence_lengthens_every_size():
    """ViT's sequence length is a number in the captured graph: the views and the all-visible mask
    follow ``S + P``, the class token stays first among the real positions (AdapterHub's cases check
    the values; here the shapes and the unchanged real-token path at init)."""
    base, inputs = _matrix_model("vit")
    with torch.no_grad():
        plain = base.vit(**inputs).last_hidden_state
    model = fxadapt.AdaptedModel(base.vit)
    model.add_adapter("p", PromptTuningConfig(prompt_length=3), set_active=True)
    model.eval()
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    assert out.shape == (plain.shape[0], plain.shape[1] + 3, plain.shape[2])
    assert not torch.allclose(out[:, 3:], plain)  # the real positions attend to the prompt


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("beit", {"use_relative_position_bias": True}, "relative position table"),
        ("swin", {}, "cannot be told apart"),
    ],
)
def test_prompt_tuning_refuses_what_it_cannot_lengthen(name, options, message):
    base, inputs = _matrix_model(name, **options)
    model = fxadapt.AdaptedModel(base)
    with pytest.raises(fxadapt.FxAdaptError, match=message):
        model.add_adapter("p", "prompt_tuning", set_active=True)
    assert "p" not in model.adapters and model.active_adapters is None


def test_prefix_tuning_refuses_a_bias_inside_the_score_matmul():
    """BLOOM adds ALiBi inside ``baddbmm``: a bias for the prefix positions would be a guess."""
    base, _ = _matrix_model("bloom")
    model = fxadapt.AdaptedModel(base)
    with pytest.raises(fxadapt.FxAdaptError, match="ALiBi"):
        model.add_adapter("p", "prefix_tuning", set_active=True)
    assert "p" not in model.adapters
