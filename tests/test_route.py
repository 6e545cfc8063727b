"""Per-row adapter routing (``adapter_names=``): each row equals that row run alone with its adapter.

Oracles: the same model with each adapter active alone, row by row; PEFT's own mixed batch
(``adapter_names=``) with the same LoRA weights. A new assignment of rows must reuse the graph:
the runner cache does not grow in eager mode, and torch.compile makes one graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, main_output, make
from peft import LoraConfig, get_peft_model

import fxadapt
from fxadapt import ConfigError, LoRAConfig

ARCHS = ["bert", "gpt2", "llama", "bart"]
ADAPTERS = {
    "lora": "lora[r=4,init_weights=bert]",
    "ia3": "ia3[init_weights=bert]",
    "bn": "seq_bn[init_weights=bert,reduction_factor=4]",
    "p2": "prefix_tuning[prefix_length=2]",
    "p5": "prefix_tuning[prefix_length=5,flat=True]",
}


def _inputs(arch: str, b: int) -> dict[str, torch.Tensor]:
    inputs = batch(b, 7, pad=2)
    if arch == "bart":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    return inputs


def _model(arch: str, **kwargs) -> fxadapt.AdaptedModel:
    model = fxadapt.AdaptedModel(make(arch), **kwargs)
    for name, config in ADAPTERS.items():
        model.add_adapter(name, config)
    with torch.no_grad():  # LoRA's bert init is small: make every adapter clearly visible
        for p in model.adapters["lora"].parameters():
            p.mul_(20)
    return model.eval()


def _alone(model: fxadapt.AdaptedModel, inputs: dict, names: list) -> list[torch.Tensor]:
    rows = []
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        rows.append(main_output(model(**{k: v[i : i + 1] for k, v in inputs.items()})))
    model.set_active_adapters(None)
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_equals_that_row_alone_with_its_adapter(arch):
    model = _model(arch)
    inputs = _inputs(arch, 6)
    first = ["lora", "ia3", None, "bn", "p2", "p5"]
    second = ["p5", "__base__", "bn", "p2", "lora", "lora"]
    with torch.no_grad():
        routed = main_output(model(**inputs, adapter_names=first))
        graphs = len(model._runners)
        routed_again = main_output(model(**inputs, adapter_names=second))
        assert len(model._runners) == graphs  # a new assignment reuses the graph
        alone = _alone(model, inputs, first)
        base = main_output(model(**inputs))
    for i, row in enumerate(alone):
        torch.testing.assert_close(routed[i : i + 1], row, atol=2e-5, rtol=0)
        if first[i] is not None:  # the adapter does something to its row
            assert (row - base[i : i + 1]).abs().max() > 1e-3
    with torch.no_grad():
        for i, row in enumerate(_alone(model, inputs, [n if n != "__base__" else None for n in second])):
            torch.testing.assert_close(routed_again[i : i + 1], row, atol=2e-5, rtol=0)


def test_unions_and_compacter_route_and_the_graph_shows_the_gathers():
    model = fxadapt.AdaptedModel(make("llama"))
    model.add_adapter("mam", "mam")
    model.add_adapter("cp", "compacter[init_weights=bert,reduction_factor=4]")
    model.add_adapter("lu", "lora[r=2,init_weights=bert]|seq_bn[init_weights=bert]")
    model.eval()
    inputs = _inputs("llama", 4)
    names = ["cp", "mam", None, "lu"]
    with torch.no_grad():
        for p in model.adapters["mam"].parameters():
            p.add_(0.05 * torch.randn_like(p))  # MAM's parallel adapter starts at 0
        routed = main_output(model(**inputs, adapter_names=names))
        for i, row in enumerate(_alone(model, inputs, names)):
            torch.testing.assert_close(routed[i : i + 1], row, atol=2e-5, rtol=0)
    code = model.graph_for(**inputs, adapter_names=names).code
    assert "route_lora" in code and "select_rows" in code and "route_prefix" in code


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_same_as_peft_mixed_batch(arch, tmp_path):
    """PEFT's ``adapter_names=`` with the same LoRA weights (two ranks, two scalings) gives the same rows."""
    targets = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj", "down_proj"]}[
        arch
    ]
    base = make(arch).eval()
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        adapter_name="a",
    )
    peft_model.add_adapter(
        "b", LoraConfig(r=8, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    )
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = fxadapt.AdaptedModel(copy.deepcopy(base))
    for name in ("a", "b"):
        model.load_adapter(tmp_path / name, load_as=name)
    model.eval()
    inputs = batch(5, 9)
    names = ["b", "a", "__base__", "a", "b"]
    with torch.no_grad():
        expected = main_output(peft_model(**inputs, adapter_names=names))
        routed = main_output(model(**inputs, adapter_names=[None if n == "__base__" else n for n in names]))
        plain = main_output(base(**inputs))
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=0)
    assert (expected[[0, 1]] - plain[[0, 1]]).abs().max() > 1e-3


def test_new_assignments_and_batch_sizes_compile_once():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fxadapt.AdaptedModel(make("bert"), compile=True, compile_options={"backend": counting_backend})
    eager = fxadapt.AdaptedModel(make("bert"))
    for m in (model, eager):
        torch.manual_seed(3)
        m.add_adapter("a", "lora[init_weights=bert]")
        m.add_adapter("b", "seq_bn[init_weights=bert]")
        m.add_adapter("c", "prefix_tuning[prefix_length=3]")
        m.eval()
    calls = [
        (4, ["a", "b", "c", None]),
        (4, ["c", "c", "a", "b"]),
        (3, [None, "b", "a"]),
        (5, ["a", "a", "a", "a", "a"]),
    ]
    with torch.no_grad():
        for b, names in calls:
            inputs = batch(b, 6 + b)
            out = main_output(model(**inputs, adapter_names=names))
            torch.testing.assert_close(
                out, main_output(eager(**inputs, adapter_names=names)), atol=1e-5, rtol=0
            )
    assert len(graphs) == 1
    assert len(model._runners) == 1


def test_routing_with_skip_layers_skips_them_in_every_row():
    model = _model("bert")
    inputs = _inputs("bert", 3)
    names = ["lora", "bn", "p2"]
    with torch.no_grad():
        routed = main_output(model(**inputs, adapter_names=names))
        model.set_active_adapters(None, skip_layers=[1])
        skipped = main_output(model(**inputs, adapter_names=names))
        rows = []
        for i, name in enumerate(names):
            model.set_active_adapters(name, skip_layers=[1])
            rows.append(main_output(model(**{k: v[i : i + 1] for k, v in inputs.items()})))
    torch.testing.assert_close(skipped, torch.cat(rows), atol=2e-5, rtol=0)
    assert (skipped - routed).abs().max() > 1e-3


def test_clear_errors_before_anything_runs():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", "lora")
    model.add_adapter("pt", "prompt_tuning[prompt_length=2]")
    model.add_adapter("g", LoRAConfig(use_gating=True))
    model.add_adapter("r", "loreft")
    model.eval()
    inputs = batch(2)
    with torch.no_grad():
        model(**inputs)
    graphs = dict(model._runners)
    cases = {
        "inference only": dict(adapter_names=["a", "a"], training=True),
        "2 rows": dict(adapter_names=["a"]),
        "no adapter named \\['zz'\\]": dict(adapter_names=["a", "zz"]),
        "prompt_tuning has no per-row form": dict(adapter_names=["pt", None]),
        "loreft has no per-row form": dict(adapter_names=[None, "r"]),
        "gated": dict(adapter_names=["g", "a"]),
        "one adapter name \\(or None\\) per row": dict(adapter_names="a"),
        "must be an adapter name": dict(adapter_names=["a", 3]),
    }
    for message, case in cases.items():
        model.train(case.get("training", False))
        with pytest.raises(ConfigError, match=message), torch.no_grad():
            model(**inputs, adapter_names=case["adapter_names"])
    model.eval()
    model.merge_adapter("a")
    with pytest.raises(ConfigError, match="merged"), torch.no_grad():
        model(**inputs, adapter_names=["a", None])
    assert dict(model._runners) == graphs


def test_adding_an_adapter_replaces_the_routed_graph():
    model = fxadapt.AdaptedModel(make("bert")).eval()
    model.add_adapter("a", "lora[init_weights=bert]")
    inputs = batch(2)
    with torch.no_grad():
        model(**inputs, adapter_names=["a", None])
        assert len(model._runners) == 1
        model.add_adapter("b", "lora[init_weights=bert]")
        assert not model._runners  # the routed graph held "a" only: dropped
        model(**inputs, adapter_names=["b", "a"])
    (key,) = model._runners
    assert list(key[2]) == ["a", "b"]
