"""Regional compilation: identical layers share one compiled sub-graph, with the whole graph's numbers."""

from __future__ import annotations

import copy
from unittest.mock import patch

import pytest
import torch
from conftest import batch, make
from torch import nn

import fxadapt
from fxadapt import LoRAConfig
from fxadapt.errors import ConfigError
from passes.regions import Region, regionalize


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class _Tower(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.inp = nn.Linear(4, widths[0])
        self.layers = nn.ModuleList(_Block(w) for w in widths)
        self.proj = nn.ModuleList(nn.Identity() for _ in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x.sum(-1)


def _graph(widths: list[int]) -> tuple[nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = _Tower(widths)
    return model, torch.export.export(model, (torch.randn(3, 4),)).module(check_guards=False)


def test_identical_layers_share_one_template_on_a_tiny_graph():
    model, gm = _graph([6, 6, 6])
    calls = []
    report = regionalize(gm, lambda f: calls.append(f) or f)
    assert (report.regions, report.shapes, report.compiled, len(calls)) == (3, 1, 1, 1)
    regions = [m for m in gm.modules() if isinstance(m, Region)]
    assert len(regions) == 3 and len({r.run for r in regions}) == 1
    assert regions[1].body.a0 is model.layers[1].up.weight  # the layer's own weights, not copies
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_layer_of_another_shape_gets_its_own_template():
    # layer 1 is narrower: its weights have other shapes, so it cannot share layer 0's compiled code
    model = _Tower([6, 6, 6])
    model.layers[1] = _Block(6)
    model.layers[1].up = nn.Linear(6, 8)
    model.layers[1].down = nn.Linear(8, 6)
    mixed = torch.export.export(model, (torch.randn(3, 4),)).module(check_guards=False)
    report = regionalize(mixed)
    assert (report.regions, report.shapes, report.compiled) == (3, 2, 1)  # the odd one runs eagerly
    x = torch.randn(3, 4)
    torch.testing.assert_close(mixed(x), model(x), rtol=0, atol=0)


def _counting():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def _no_dropout(arch: str, layers: int) -> nn.Module:
    if arch == "bert":
        return make(
            arch,
            head=True,
            num_hidden_layers=layers,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    return make(arch, head=True, num_hidden_layers=layers)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_regional_compilation_matches_the_whole_graph(arch):
    """Outputs and LoRA gradients of regional and whole-graph inductor compilation agree to 1e-6."""
    torch._dynamo.reset()
    base = _no_dropout(arch, 3)
    cfg = LoRAConfig(r=4, alpha=8, init_weights="bert")
    whole = fxadapt.adapt(copy.deepcopy(base), cfg, compile="whole")
    regional = fxadapt.adapt(base, cfg, compile="regional")
    regional.adapters.load_state_dict(whole.adapters.state_dict())
    inputs = batch(3, 7)
    labels = inputs["input_ids"] if arch == "llama" else torch.tensor([0, 1, 1])
    out_w, out_r = whole(**inputs, labels=labels), regional(**inputs, labels=labels)
    torch.testing.assert_close(out_r.logits, out_w.logits, rtol=0, atol=1e-6)
    out_w.loss.backward()
    out_r.loss.backward()
    for (k, pw), (_, pr) in zip(whole.adapters.named_parameters(), regional.adapters.named_parameters()):
        torch.testing.assert_close(pr.grad, pw.grad, rtol=0, atol=1e-6, msg=k)


def test_one_compiled_graph_per_distinct_layer_shape():
    torch._dynamo.reset()
    graphs, backend = _counting()
    model = fxadapt.adapt(
        make("bert", head=True, num_hidden_layers=4),
        "lora",
        compile="regional",
        compile_options={"backend": backend},
    )
    for b, s in [(2, 9), (3, 5)]:
        model(**batch(b, s), labels=torch.zeros(b, dtype=torch.long)).loss.backward()
    # four identical layers; the first one's input needs no gradient (the embeddings are frozen), so
    # it runs the shared code with its input made to need one: one compiled graph for all four, and
    # new shapes do not recompile it
    assert len(graphs) == 1
    report = next(r.fn for r in model._runners.values() if "labels" in r.input_names).meta["regions"]
    assert (report.regions, report.shapes, report.compiled) == (4, 1, 1)
    model.eval()
    with torch.no_grad():
        model(**batch())
    assert len(graphs) == 2  # the eval graph's layers: one more


def test_the_first_layer_gets_the_same_gradients_through_the_shared_code():
    base = _no_dropout("bert", 3)
    eager = fxadapt.adapt(copy.deepcopy(base), LoRAConfig(init_weights="bert"), compile=False)
    shared = fxadapt.adapt(
        base, LoRAConfig(init_weights="bert"), compile="regional", compile_options={"backend": "eager"}
    )
    shared.adapters.load_state_dict(eager.adapters.state_dict())
    for m in (eager, shared):
        m(**batch(), labels=torch.tensor([0, 1])).loss.backward()
    for (k, pe), (_, ps) in zip(eager.adapters.named_parameters(), shared.adapters.named_parameters()):
        torch.testing.assert_close(ps.grad, pe.grad, rtol=0, atol=1e-6, msg=k)
    assert all(p.grad is None for p in shared.base.bert.embeddings.parameters())  # still frozen


def test_layers_without_the_adapter_compile_separately():
    torch._dynamo.reset()
    graphs, backend = _counting()
    base = make("bert", head=True, num_hidden_layers=5)
    model = fxadapt.adapt(
        base, LoRAConfig(leave_out=[1, 2]), compile="regional", compile_options={"backend": backend}
    ).eval()
    with torch.no_grad():
        model(**batch())
    assert len(graphs) == 2  # layers 1-2 (no adapter), and 0, 3 and 4 (with it)


def test_the_inspectable_graph_keeps_its_adapter_nodes():
    model = fxadapt.adapt(
        make("bert", head=True), "lora", compile="regional", compile_options={"backend": "eager"}
    )
    model(**batch(), labels=torch.tensor([0, 1])).loss.backward()
    gm = model.graph_for(**batch(), labels=torch.tensor([0, 1]))
    assert any(n.op == "call_module" and n.target.startswith("adapters.") for n in gm.graph.nodes)
    assert not any(isinstance(m, Region) for m in gm.modules())


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ConfigError, match="regional"):
        fxadapt.AdaptedModel(make("bert"), compile="fast")


def test_compile_true_picks_whole_on_cpu_and_elsewhere_regional_for_deep_models():
    from fxadapt.compiling import REGIONAL_MIN_LAYERS, auto_mode

    cuda = torch.device("cuda")
    assert auto_mode(REGIONAL_MIN_LAYERS, cuda) == "regional"
    assert auto_mode(REGIONAL_MIN_LAYERS - 1, cuda) == "whole"
    assert auto_mode(REGIONAL_MIN_LAYERS, torch.device("cpu")) == "whole"

    def regions(layers):
        model = fxadapt.adapt(
            make("bert", head=True, num_hidden_layers=layers), "lora", compile_options={"backend": "eager"}
        )
        model(**batch(), labels=torch.tensor([0, 1]))
        fn = next(r.fn for r in model._runners.values() if "labels" in r.input_names)
        return fn.meta["regions"].regions if isinstance(fn, torch.fx.GraphModule) else None

    assert regions(REGIONAL_MIN_LAYERS) is None  # a CPU model compiles whole
    with patch("fxadapt.compiling.module_device", return_value=cuda):
        assert regions(REGIONAL_MIN_LAYERS) == REGIONAL_MIN_LAYERS
        assert regions(REGIONAL_MIN_LAYERS - 1) is None
