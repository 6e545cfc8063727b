"""Capture: the captured graph computes what the model computes, for every signature and shape."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, main_output, make
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import fxadapt
from fxadapt.capture import capture, example_inputs


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "bart"])
def test_eval_graph_matches_model_at_two_shapes(arch):
    base = make(arch).eval()
    model = fxadapt.AdaptedModel(base).eval()
    for b, s in [(2, 9), (3, 5)]:
        inputs = batch(b, s)
        if arch == "bart":
            inputs["decoder_input_ids"] = batch(b, s - 2, pad=0)["input_ids"]
        with torch.no_grad():
            expected = main_output(base(**inputs))
            got = main_output(model(**inputs))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert len(model._captures) == 1


def test_labels_get_their_own_graph_and_the_model_output_class():
    base = make("bert", head=True).eval()
    model = fxadapt.AdaptedModel(base).eval()
    inputs = batch()
    labels = torch.tensor([0, 1])
    out = model(**inputs, labels=labels)
    assert type(out) is SequenceClassifierOutput
    ref = base(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    assert model(**inputs).loss is None
    assert len(model._captures) == 2


def test_eval_graph_has_no_dropout_and_train_graph_does():
    model = fxadapt.AdaptedModel(make("bert"))
    model.train()
    train_ops = {str(n.target) for n in model.graph_module.graph.nodes}
    model.eval()
    eval_nodes = list(model.graph_module.graph.nodes)
    assert "aten.dropout.default" in train_ops
    assert not any("dropout" in str(n.target) for n in eval_nodes)
    sdpa = [n for n in eval_nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa and all(len(n.args) < 5 or n.args[4] == 0.0 for n in sdpa)


def test_parameters_are_shared_not_copied():
    base = make("bert")
    model = fxadapt.AdaptedModel(base)
    gm = model.graph_module
    assert gm.get_parameter("base.encoder.layer.0.attention.self.query.weight") is (
        base.encoder.layer[0].attention.self.query.weight
    )
    assert {id(p) for p in model.parameters()} == {id(p) for p in base.parameters()}


def test_positional_input_ids():
    base = make("bert").eval()
    model = fxadapt.AdaptedModel(base).eval()
    ids = batch(pad=0)["input_ids"]
    torch.testing.assert_close(model(ids).last_hidden_state, base(ids).last_hidden_state, atol=1e-6, rtol=0)


def test_example_inputs_cover_text_and_seq2seq():
    assert set(example_inputs(make("bert"))) == {"input_ids", "attention_mask"}
    assert "decoder_input_ids" in example_inputs(make("bart"))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, input_ids):
        x = self.proj(input_ids.float().unsqueeze(-1).expand(-1, -1, 4))
        if x.sum() > 0:
            return x * 2
        return x


def test_capture_error_names_model_and_operation():
    with pytest.raises(fxadapt.CaptureError) as info:
        capture(DataDependent(), {"input_ids": torch.ones(2, 8, dtype=torch.long)})
    msg = str(info.value)
    assert "DataDependent" in msg
    assert "if x.sum() > 0" in msg
    assert 'attn_implementation="eager"' in msg and "use_cache=False" in msg


def _more(arch):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    if arch == "vit":
        return ViTModel(ViTConfig(**small, image_size=16, patch_size=8))
    if arch == "clip_text":
        return CLIPTextModel(CLIPTextConfig(**small, vocab_size=100))
    return T5Model(T5Config(d_model=32, num_layers=1, num_heads=4, d_ff=64, d_kv=8, vocab_size=100))


@pytest.mark.parametrize("arch", ["vit", "clip_text", "t5"])
def test_more_architectures_capture_find_roles_and_adapt(arch):
    base = _more(arch).eval()
    model = fxadapt.adapt(base, fxadapt.LoRAConfig(init_weights="bert"), compile=False).eval()
    roles = {r for s in model.sites() for r in s.roles}
    assert roles == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    inputs = example_inputs(base)
    with torch.no_grad():
        adapted = model(**inputs)[0]
        model.set_active_adapters(None)
        torch.testing.assert_close(model(**inputs)[0], base(**inputs)[0], atol=1e-6, rtol=0)
    assert (adapted - base(**inputs)[0]).abs().max() > 1e-4


def test_dtype_change_rebuilds_graphs():
    base = make("bert").eval()
    model = fxadapt.AdaptedModel(base).eval()
    inputs = batch()
    model(**inputs)
    model.double()
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, base(**inputs).last_hidden_state, atol=1e-10, rtol=0)
