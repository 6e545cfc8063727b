"""Each flexible head type on a tiny model equals the same head written in plain torch (outputs and loss).

The references below recompute every head from the base model's own outputs with the head's weights,
in plain tensor code: AdapterHub's layer structures and losses. They also check the output class, the
shapes, multiple choice with 3-D inputs, and the API around heads (activation, ``head=``, deletion,
refusals before any change).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, make
from transformers import (
    BartConfig,
    BartModel,
    LlamaConfig,
    LlamaModel,
    ViTConfig,
    ViTModel,
)
from transformers import modeling_outputs as mo

import fxadapt
from fxadapt import ConfigError, FxAdaptError

B, S = 2, 9


def _bert(**kw):
    return fxadapt.AdaptedModel(make("bert", **kw)).eval()


def _lin(layer, x):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def _base_hidden(model, **inputs):
    with torch.no_grad():
        return model.base(**inputs)


def _labels(*shape, high=3, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def test_classification_head_is_adapterhubs():
    model = _bert()
    model.add_classification_head("c", num_labels=3)
    head = model.heads["c"]
    assert [type(m).__name__ for m in head] == ["Dropout", "Linear", "Activation", "Dropout", "Linear"]
    assert head.config == {
        "head_type": "classification",
        "num_labels": 3,
        "layers": 2,
        "activation_function": "tanh",
        "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2},
        "use_pooler": False,
        "bias": True,
        "dropout_prob": None,
    }
    inputs, y = batch(B, S), _labels(B)
    with torch.no_grad():
        out = model(**inputs, labels=y)
    h = _base_hidden(model, **inputs).last_hidden_state[:, 0]
    want = _lin(head[4], torch.tanh(_lin(head[1], h)))
    assert type(out) is mo.SequenceClassifierOutput and out.logits.shape == (B, 3)
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.cross_entropy(want, y))


def test_regression_pooler_and_layers1():
    model = _bert()
    model.add_classification_head("r", num_labels=1, layers=1, use_pooler=True)
    head = model.heads["r"]
    inputs = batch(B, S)
    y = torch.randn(B)
    with torch.no_grad():
        out = model(**inputs, labels=y)
    want = _lin(head[1], _base_hidden(model, **inputs).pooler_output)
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.mse_loss(want.view(-1), y))


@pytest.mark.parametrize("adder", ["multilabel", "method"])
def test_multilabel_classification(adder):
    model = _bert()
    if adder == "method":
        model.add_multi_label_classification_head("m", num_labels=4)
    else:
        model.add_classification_head("m", num_labels=4, multilabel=True)
    head = model.heads["m"]
    assert head.config["head_type"] == "multilabel_classification"
    inputs = batch(B, S)
    y = (torch.rand(B, 4, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    with torch.no_grad():
        out = model(**inputs, labels=y)
    want = _lin(head[4], torch.tanh(_lin(head[1], _base_hidden(model, **inputs).last_hidden_state[:, 0])))
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(want, y.float()))


def test_tagging_loss_only_on_attended_positions():
    model = _bert()
    model.add_tagging_head("t", num_labels=5)
    head = model.heads["t"]
    inputs, y = batch(B, S, pad=3), _labels(B, S, high=5)
    with torch.no_grad():
        out = model(**inputs, labels=y)
    want = _lin(head[1], _base_hidden(model, **inputs).last_hidden_state)
    keep = inputs["attention_mask"].bool()
    assert type(out) is mo.TokenClassifierOutput and out.logits.shape == (B, S, 5)
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.cross_entropy(want[keep], y[keep]))


def test_question_answering_clamps_positions_without_touching_the_callers():
    model = _bert()
    model.add_qa_head("q")
    head = model.heads["q"]
    inputs = batch(B, S)
    start, end = torch.tensor([1, 4]), torch.tensor([3, 50])  # 50 is outside: ignored
    with torch.no_grad():
        out = model(**inputs, start_positions=start, end_positions=end)
    logits = _lin(head[1], _base_hidden(model, **inputs).last_hidden_state)
    assert type(out) is mo.QuestionAnsweringModelOutput
    torch.testing.assert_close(out.start_logits, logits[..., 0])
    torch.testing.assert_close(out.end_logits, logits[..., 1])
    want = (F.cross_entropy(logits[..., 0], start) + F.cross_entropy(logits[:1, :, 1], end[:1])) / 2
    torch.testing.assert_close(out.loss, want)
    assert end.tolist() == [3, 50]


def test_multiple_choice_with_3d_inputs():
    model = _bert()
    model.add_multiple_choice_head("mc", num_choices=3)
    head = model.heads["mc"]
    flat = batch(B * 3, S)
    inputs = {k: v.view(B, 3, S) for k, v in flat.items()}
    y = _labels(B)
    with torch.no_grad():
        out = model(**inputs, labels=y)
    h = _base_hidden(model, **flat).last_hidden_state[:, 0]
    want = _lin(head[4], torch.tanh(_lin(head[1], h))).view(B, 3)
    assert type(out) is mo.MultipleChoiceModelOutput and out.logits.shape == (B, 3)
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.cross_entropy(want, y))


def test_masked_lm_head_ties_its_output_embedding():
    model = _bert()
    model.add_masked_lm_head("mlm")
    head = model.heads["mlm"]
    emb = model.base.get_input_embeddings().weight
    assert head[3].weight is emb and head[2].eps == 1e-12
    inputs = batch(B, S)
    y = torch.full((B, S), -100)
    y[:, 2] = torch.tensor([5, 7])
    with torch.no_grad():
        out = model(**inputs, labels=y)
    h = _base_hidden(model, **inputs).last_hidden_state
    x = F.layer_norm(F.gelu(_lin(head[0], h)), (32,), head[2].weight, head[2].bias, 1e-12)
    want = x @ emb.T + head[3].bias
    assert type(out) is mo.MaskedLMOutput and out.logits.shape == (B, S, 100)
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.cross_entropy(want.reshape(-1, 100), y.reshape(-1)))


def test_causal_lm_head_on_gpt2_shifts_labels():
    model = fxadapt.AdaptedModel(make("gpt2")).eval()
    model.add_causal_lm_head("lm")
    head = model.heads["lm"]
    assert head[3].weight is model.base.get_input_embeddings().weight
    inputs = batch(B, S, pad=0)
    y = inputs["input_ids"]
    with torch.no_grad():
        out = model(**inputs, labels=y)
    h = _base_hidden(model, **inputs).last_hidden_state
    x = F.layer_norm(F.gelu(_lin(head[0], h)), (32,), head[2].weight, head[2].bias, 1e-12)
    want = _lin(head[3], x)
    assert type(out) is mo.CausalLMOutputWithPast
    torch.testing.assert_close(out.logits, want)
    loss = F.cross_entropy(want[:, :-1].reshape(-1, 100), y[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, loss)


def _bart():
    cfg = BartConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=100,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return fxadapt.AdaptedModel(BartModel(cfg)).eval()


def test_seq2seq_lm_head_on_bart():
    model = _bart()
    model.add_seq2seq_lm_head("s2s")
    head = model.heads["s2s"]
    assert list(head.state_dict()) == ["0.weight"] and head[0].weight is model.base.shared.weight
    inputs = batch(B, S)
    inputs["decoder_input_ids"] = batch(B, 6)["input_ids"]
    y = batch(B, 6, pad=0)["input_ids"]
    with torch.no_grad():
        out = model(**inputs, labels=y)
    base = _base_hidden(model, **inputs)
    want = base.last_hidden_state @ model.base.shared.weight.T
    assert type(out) is mo.Seq2SeqLMOutput
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.cross_entropy(want.reshape(-1, 100), y.reshape(-1)))
    torch.testing.assert_close(out.encoder_last_hidden_state, base.encoder_last_hidden_state)


def test_bart_classification_reads_the_last_eos_token():
    model = _bart()
    model.add_classification_head("c", num_labels=2, layers=1)
    inputs = batch(B, S, pad=0)
    inputs["input_ids"][:, [3, 6]] = 2  # two eos per row: the last one counts
    with torch.no_grad():
        out = model(**inputs)
    h = _base_hidden(model, **inputs).last_hidden_state[:, 6]
    assert type(out) is mo.Seq2SeqSequenceClassifierOutput
    torch.testing.assert_close(out.logits, _lin(model.heads["c"][1], h))


@pytest.mark.parametrize("pad_token_id", [None, 0])
def test_decoder_only_classification_reads_the_last_real_token(pad_token_id):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        pad_token_id=pad_token_id,
    )
    model = fxadapt.AdaptedModel(LlamaModel(cfg)).eval()
    model.add_classification_head("c", num_labels=2, layers=1)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids)
        h = model.base(input_ids=ids).last_hidden_state
    last = torch.tensor([4, 2]) if pad_token_id is not None else torch.tensor([4, 4])
    torch.testing.assert_close(out.logits, _lin(model.heads["c"][1], h[torch.arange(2), last]))


def test_image_classification_on_vit():
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
        )
    )
    model = fxadapt.AdaptedModel(vit).eval()
    model.add_image_classification_head("img", num_labels=3)
    head = model.heads["img"]
    assert len(head) == 2  # AdapterHub's adder default: layers=1
    pixels, y = torch.randn(B, 3, 32, 32), _labels(B)
    with torch.no_grad():
        out = model(pixel_values=pixels, labels=y)
    want = _lin(head[1], _base_hidden(model, pixel_values=pixels).last_hidden_state[:, 0])
    assert type(out) is mo.ImageClassifierOutput
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, F.cross_entropy(want, y))
    with pytest.raises(ConfigError, match="text model"):
        model.add_tagging_head("t")


def test_head_trains_with_the_adapter_in_one_graph():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("heads.")} == {
        f"heads.a.{i}.{w}" for i in (1, 4) for w in ("weight", "bias")
    }
    assert not any(n.startswith("base.") for n in trainable)
    out = model(**batch(B, S), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    heads = [
        n
        for n in model.graph_for(**batch(B, S), labels=torch.tensor([0, 1])).graph.nodes
        if n.op == "call_module"
    ]
    assert [n.target for n in heads if n.target.startswith("heads.")] == ["heads.a"]
    model.eval()
    dropped = [
        n for n in model.graph_module.graph.nodes if n.op == "call_function" and "dropout" in str(n.target)
    ]
    assert not dropped


def test_return_dict_false_gives_hf_tuples():
    model = _bert()
    model.add_classification_head("c", num_labels=3)
    inputs, y = batch(B, S), _labels(B)
    with torch.no_grad():
        out = model(**inputs, labels=y)
        tup = model(**inputs, labels=y, return_dict=False)
        hidden = model(**inputs, output_hidden_states=True)
    assert isinstance(tup, tuple) and len(tup) == 2
    torch.testing.assert_close(tup[0], out.loss)
    torch.testing.assert_close(tup[1], out.logits)
    assert len(hidden.hidden_states) == 3 and hidden.loss is None


def test_choosing_and_deleting_heads():
    model = _bert()
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.add_tagging_head("t", num_labels=4)
    assert model.active_head == "t"  # adding activates (AdapterHub's default)
    assert list(model.heads) == ["a", "t"]
    model.set_active_adapters("a")
    assert model.active_head == "a"
    inputs = batch(B, S)
    with torch.no_grad():
        assert model(**inputs).logits.shape == (B, 2)
        assert model(**inputs, head="t").logits.shape == (B, S, 4)
    assert model.get_labels() == ["LABEL_0", "LABEL_1"] and model.base.config.id2label == {
        0: "LABEL_0",
        1: "LABEL_1",
    }
    model.delete_head("a")
    assert model.active_head is None and list(model.heads) == ["t"]
    with torch.no_grad():
        assert type(model(**inputs)).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    with pytest.raises(FxAdaptError, match="no head is active"):
        model(**inputs, labels=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="no head named"):
        model(**inputs, head="nope")
    with pytest.raises(ConfigError, match="no head named"):
        model.active_head = "nope"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.add_classification_head("x", num_labels=0), "num_labels"),
        (lambda m: m.add_classification_head("x", activation_function="nope"), "activation_function"),
        (lambda m: m.add_classification_head("x.y"), "without dots"),
        (lambda m: m.add_seq2seq_lm_head("x"), "encoder-decoder"),
        (lambda m: m.add_image_classification_head("x"), "vision model"),
        (lambda m: m.add_prediction_head_from_config("x", {"head_type": "nope"}), "unknown head type"),
        (
            lambda m: m.add_prediction_head_from_config("x", {"head_type": "tagging", "bias": True}),
            "no option",
        ),
        (lambda m: m.add_tagging_head("t"), "exists"),
    ],
)
def test_bad_heads_are_refused_before_any_change(call, message):
    model = _bert()
    model.add_tagging_head("t")
    with pytest.raises(ConfigError, match=message):
        call(model)
    assert list(model.heads) == ["t"] and model.active_head == "t"


def test_flexible_heads_need_a_model_without_a_head():
    model = fxadapt.AdaptedModel(make("bert", head=True))
    with pytest.raises(ConfigError, match="own task head"):
        model.add_classification_head("c")
    assert not model.heads


def test_heads_under_torch_compile_make_one_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fxadapt.AdaptedModel(make("bert"), compile="whole", compile_options={"backend": backend})
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    out = model(**batch(B, S), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert len(graphs) == 1
    assert any(n.op == "call_module" and n.target.startswith("heads") for n in model.graph_module.graph.nodes)
