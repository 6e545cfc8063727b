"""AdapterDrop (``skip_layers``): a fixed setting removes nodes; in training, skipping is a graph input.

Oracles: the same model in eval mode with the skipped layers' adapter nodes removed (dropout 0), a
prefix left out of the layer by its own config (``leave_out``) with the same values, exact zero
gradients for the skipped layers' adapters, and one compiled graph for training steps whose
``skip_layers`` change.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, main_output, make
from transformers import TrainerCallback

import fxadapt
from fxadapt import ConfigError
from fxadapt.adapter import slot
from fxadapt.compose.drop import TENSOR
from passes.compose import KEEP_INPUT, layer_numbers

NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": {},
    "bart": dict(dropout=0.0),
}
UNION = "lora[init_weights=bert]|seq_bn[init_weights=bert]|prefix_tuning[prefix_length=3]"


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    inputs = batch(3, 7, pad=2)
    if arch == "bart":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    return inputs


def _layered_grads(adapter, numbers: dict[str, int]) -> dict[int, list[torch.Tensor]]:
    """The gradients of the adapter's per-site modules (LoRA, bottleneck), by layer over the model."""
    out: dict[int, list[torch.Tensor]] = {}
    for method, _, keys in adapter.parts():
        if method.name == "prefix_tuning":
            continue  # one module per location: it spans the layers
        for key, own in keys.items():
            for p in adapter.layers[slot(own)].parameters():
                out.setdefault(numbers[key], []).append(p.grad)
    return out


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "bart"])
def test_training_skip_equals_the_layers_removed_and_gives_zero_gradients(arch):
    model = fxadapt.AdaptedModel(make(arch, **NO_DROPOUT[arch]))
    model.add_adapter("u", UNION)
    model.train_adapter("u")
    inputs = _inputs(arch)
    numbers = layer_numbers(model.sites())
    layers = max(numbers.values()) + 1
    model.eval()
    with torch.no_grad():
        full = main_output(model(**inputs))
    for skip in ([0], [layers - 1], list(range(layers))):
        model.train()
        model.set_active_adapters("u", skip_layers=skip)
        out = main_output(model(**inputs))
        out.pow(2).sum().backward()
        grads = _layered_grads(model.adapters["u"], numbers)
        prefix = [p.grad for n, p in model.adapters["u"].named_parameters() if "control_trans" in n]
        model.eval()
        with torch.no_grad():
            removed = main_output(model(**inputs))
        torch.testing.assert_close(out.detach(), removed, atol=1e-5, rtol=0)
        assert (removed - full).abs().max() > 1e-5
        for layer, gs in grads.items():
            zero = all(g is not None and not g.any() for g in gs)
            assert zero == (layer in skip), (skip, layer)
        assert all(not g.any() for g in prefix) == (len(skip) == layers)
        model.zero_grad()
    train_keys = [k for k in model._runners if k[1] and k[4]]  # train_adapter built one without skipping
    assert [k[4] for k in train_keys] == [TENSOR]  # one training graph for every skip setting


def test_fixed_skip_removes_the_nodes_and_training_reads_a_keep_input():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("u", "lora|seq_bn")
    numbers = layer_numbers(model.sites())
    model.set_active_adapters("u", skip_layers=[0])
    model.eval()
    nodes = [n for n in model.graph_module.graph.nodes if "site" in n.meta.get("fxadapt", {})]
    layers = {numbers[n.meta["fxadapt"]["site"]] for n in nodes}
    assert layers == {1}
    assert KEEP_INPUT not in [n.target for n in model.graph_module.graph.nodes if n.op == "placeholder"]
    model.train()
    graph = model.graph_module.graph
    assert KEEP_INPUT in [n.target for n in graph.nodes if n.op == "placeholder"]
    sites = {n.meta["fxadapt"]["site"] for n in graph.nodes if "site" in n.meta.get("fxadapt", {})}
    assert {numbers[k] for k in sites} == {0, 1}


@pytest.mark.parametrize("training", [False, True])
def test_prefix_skip_equals_the_prefix_left_out_of_that_layer(training):
    """Skipping layer 0 of a flat prefix equals a prefix whose config leaves layer 0 out (same values)."""
    model = fxadapt.AdaptedModel(make("bert", **NO_DROPOUT["bert"]))
    model.add_adapter("a", "prefix_tuning_flat[prefix_length=3]")
    model.add_adapter("b", "prefix_tuning_flat[prefix_length=3,leave_out=[0]]")
    (a,) = [m for _, m in model.adapters["a"].items()]
    (b,) = [m for _, m in model.adapters["b"].items()]
    with torch.no_grad():
        b.control_trans.copy_(a.values()[:, 2:4].reshape(-1))
    inputs = _inputs("bert")
    model.train(training)
    with torch.set_grad_enabled(training):
        model.set_active_adapters("b")
        left_out = main_output(model(**inputs))
        model.set_active_adapters("a", skip_layers=[0])
        skipped = main_output(model(**inputs))
        model.set_active_adapters("a")
        whole = main_output(model(**inputs))
    torch.testing.assert_close(skipped, left_out, atol=1e-5, rtol=0)
    assert (whole - skipped).abs().max() > 1e-3


def test_bart_counts_decoder_layers_after_the_encoders():
    model = fxadapt.AdaptedModel(make("bart"))
    model.add_adapter("x", "seq_bn")
    model.set_active_adapters("x", skip_layers=[1])  # AdapterHub's layer 1: the decoder's layer 0
    model.eval()
    inputs = _inputs("bart")
    sites = {n.meta["fxadapt"]["site"] for n in model.graph_for(**inputs).graph.nodes if "fxadapt" in n.meta}
    assert sites and all(k.startswith("encoder.") for k in sites)
    with pytest.raises(ConfigError, match=r"layers \[2\].*\[0, 1\]"):
        model.set_active_adapters("x", skip_layers=[2])


def test_training_steps_with_new_skip_layers_compile_once():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fxadapt.AdaptedModel(make("bert"), compile="whole", compile_options={"backend": counting_backend})
    model.add_adapter("u", UNION)
    model.train_adapter("u")
    inputs = batch()
    for skip in ([0], [1], [0, 1], [1]):
        model.set_active_adapters("u", skip_layers=skip)
        main_output(model(**inputs)).pow(2).sum().backward()
    assert len(graphs) == 1
    model.set_active_adapters("u")  # skipping nothing runs the plain graph: compiled once more
    main_output(model(**inputs)).sum().backward()
    model.set_active_adapters("u", skip_layers=[0])
    main_output(model(**inputs)).sum().backward()
    assert len(graphs) == 2


def test_a_method_without_a_keep_input_warns_and_builds_a_graph_per_setting():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("r", "loreft")
    model.train_adapter("r")
    for skip in ([0], [1]):
        model.set_active_adapters("r", skip_layers=skip)
        with pytest.warns(UserWarning, match="loreft cannot skip layers through a graph input"):
            model(**batch())
    assert {k[4] for k in model._runners} - {frozenset()} == {frozenset({0}), frozenset({1})}


def test_adapter_drop_callback_draws_lowest_layers_each_step_and_clears_after():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", "lora")
    model.train_adapter("a")
    callback = fxadapt.AdapterDropCallback(seed=0)
    assert isinstance(callback, TrainerCallback)
    drawn = set()
    for _ in range(12):
        callback.on_step_begin(None, None, None, model=model)
        drawn.add(model._skip_layers)
        callback.on_step_end(None, None, None, model=model)
        assert model._skip_layers == frozenset() and model.active_adapters == fxadapt.Stack("a")
    assert drawn == {frozenset(), frozenset({0})}  # up to every layer but the last
    with pytest.raises(ConfigError, match="max_skip"):
        fxadapt.AdapterDropCallback(max_skip=-1)
    with pytest.raises(ConfigError, match="3.*2 layers"):
        fxadapt.AdapterDropCallback(max_skip=3).on_step_begin(None, None, None, model=model)
    with pytest.raises(ConfigError, match="AdaptedModel"):
        callback.on_step_begin(None, None, None, model=make("bert"))
