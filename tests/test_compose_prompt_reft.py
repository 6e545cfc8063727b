"""Prompt tuning and ReFT in composition blocks: row blocks get their own, ReFT stacks, the rest is refused.

Oracles: each adapter run alone on its rows (BatchSplit) or on the whole batch (Parallel); for a
ReFT Stack, the HF model with each intervention hooked onto the layer outputs one after another.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import batch, main_output, make

import fxadapt
from fxadapt import Average, BatchSplit, Fuse, Parallel, PromptTuningConfig, Split, Stack, Sum
from fxadapt.errors import ConfigError, FxAdaptError
from passes.reft import real_token_bounds

PROMPTS = {"pa": PromptTuningConfig(prompt_length=5), "pb": PromptTuningConfig(prompt_length=3)}
REFTS = {
    "ra": "loreft[prefix_positions=2,suffix_positions=1,r=2,dropout=0.0]",
    "rb": "direft[prefix_positions=1,suffix_positions=2,r=2,dropout=0.0,layers=[1],non_linearity=tanh]",
    "rc": "noreft[prefix_positions=3,suffix_positions=0,dropout=0.0]",
}
LAYERS = {"bert": "encoder.layer", "gpt2": "h", "llama": "layers"}


@functools.cache
def _model(arch: str, impl: str = "eager") -> fxadapt.AdaptedModel:
    """One model per architecture for this file (a capture is the slow part): prompts, ReFTs and a LoRA."""
    model = fxadapt.AdaptedModel(make(arch, attn_implementation=impl))
    for i, (name, config) in enumerate({**PROMPTS, **REFTS, "l": "lora"}.items()):
        model.add_adapter(name, config)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _run(model: fxadapt.AdaptedModel, setup, inputs: dict) -> torch.Tensor:
    model.set_active_adapters(setup)
    with torch.no_grad():
        return main_output(model(**inputs))


def _rows(inputs: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in inputs.items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


# ---- prompt tuning -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, impl", [("bert", "eager"), ("gpt2", "eager"), ("llama", "eager"), ("llama", "sdpa")]
)
def test_prompt_row_blocks_and_channels_equal_each_adapter_alone(arch, impl):
    """Prompts of 5 and 3 and a LoRA: every row is 5 + S long, each row its adapter's output left-padded."""
    model = _model(arch, impl)
    inputs = batch(4, 9, 3)  # the last row (in pb's block) is padded
    out = _run(model, BatchSplit("l", "pa", "pb", batch_sizes=[1, 1, 2]), inputs)
    assert out.shape[:2] == (4, 5 + 9)
    _close(out[0:1, 5:], _run(model, "l", _rows(inputs, 0, 1)))  # no prompt: 5 masked positions
    _close(out[1:2], _run(model, "pa", _rows(inputs, 1, 2)))
    _close(out[2:4, 2:], _run(model, "pb", _rows(inputs, 2, 4)))  # 2 masked positions, then pb's 3
    out = _run(model, Parallel("pa", "pb"), inputs)
    assert out.shape[:2] == (8, 14)
    _close(out[:4], _run(model, "pa", inputs))
    _close(out[4:, 2:], _run(model, "pb", inputs))
    assert torch.equal(_run(model, Stack("pa"), inputs), _run(model, "pa", inputs))
    assert torch.isfinite(out).all()


def test_prompt_rows_need_the_attention_mask():
    model = _model("bert")
    model.set_active_adapters(BatchSplit("pa", "pb", batch_sizes=[1, 1]))
    with pytest.raises(FxAdaptError, match="pass attention_mask"):
        model(input_ids=batch(2, 6)["input_ids"])


def test_prompt_rows_train_a_causal_lm():
    """Labels get P_max ignored positions; padded positions never give NaNs; both prompts learn."""
    model = fxadapt.AdaptedModel(make("llama", head=True))
    model.add_adapter("pa", PROMPTS["pa"])
    model.add_adapter("pb", PROMPTS["pb"])
    model.train_adapter(BatchSplit("pa", "pb", batch_sizes=[2, 1]))
    inputs = batch(3, 8, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(4):
        out = model(**inputs, labels=inputs["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(out.loss.item())
    assert out.logits.shape[:2] == (3, 5 + 8)
    assert losses[-1] < losses[0]


# ---- ReFT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_reft_row_blocks_and_channels_equal_each_adapter_alone(arch):
    model = _model(arch)
    inputs = batch(4, 9, 3)
    out = _run(model, BatchSplit("l", "ra", "rb", batch_sizes=[1, 1, 2]), inputs)
    for name, (start, stop) in zip(["l", "ra", "rb"], [(0, 1), (1, 2), (2, 4)]):
        _close(out[start:stop], _run(model, name, _rows(inputs, start, stop)))
    out = _run(model, Parallel("ra", Stack("rb", "rc")), inputs)
    _close(out[:4], _run(model, "ra", inputs))
    _close(out[4:], _run(model, Stack("rb", "rc"), inputs))
    assert torch.equal(_run(model, Stack("ra"), inputs), _run(model, "ra", inputs))


def _hooked(model: fxadapt.AdaptedModel, arch: str, names: list[str], inputs: dict) -> torch.Tensor:
    """The HF model with ``names``' interventions applied one after another at each layer's output."""
    base = model.base
    layers = base
    for part in LAYERS[arch].split("."):
        layers = getattr(layers, part)
    bounds = real_token_bounds(inputs["attention_mask"])
    handles = []
    for i, layer in enumerate(layers):
        mods = [m for n in names for k, m in model.adapters[n].items() if f".{i}." in f".{k}"]

        def apply(h, mods=mods):
            for m in mods:
                h = m(h, bounds)
            return h

        def hook(module, args, output, apply=apply):
            return apply(output) if isinstance(output, torch.Tensor) else (apply(output[0]), *output[1:])

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return main_output(base(**inputs))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_reft_stack_applies_the_interventions_one_after_another(arch):
    model = _model(arch)
    inputs = batch(3, 8, 2)
    stacked = _run(model, Stack("ra", "rb", "rc"), inputs)
    _close(stacked, _hooked(model, arch, ["ra", "rb", "rc"], inputs))
    reverse = _run(model, Stack("rc", "rb", "ra"), inputs)
    _close(reverse, _hooked(model, arch, ["rc", "rb", "ra"], inputs))
    assert (stacked - reverse).abs().max() > 1e-3  # the order matters: rb reads ra's output
    rows = _run(model, BatchSplit(Stack("ra", "rb"), "rc", batch_sizes=[2, 1]), inputs)
    _close(rows[:2], _run(model, Stack("ra", "rb"), _rows(inputs, 0, 2)))
    _close(rows[2:], _run(model, "rc", _rows(inputs, 2, 3)))


# ---- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setup, message",
    [
        (Stack("pa", "pb"), "prompt_tuning adapters cannot be composed with Stack"),
        (Average("pa", "pb"), "prompt_tuning adapters cannot be composed with Average"),
        (Split("pa", "pb", splits=[3, 3]), "prompt_tuning adapters cannot be composed with Split"),
        (Sum("pa", "pb"), "prompt_tuning adapters cannot be composed with Sum"),
        (Average("ra", "rc"), "loreft adapters cannot be composed with Average"),
        (Split("ra", "rc", splits=[3, 3]), "loreft adapters cannot be composed with Split"),
        (Sum("ra", "rc"), "loreft adapters cannot be composed with Sum"),
        (Fuse("ra", "rc"), "no fusion layer"),
        (Fuse("pa", "pb"), "no fusion layer"),
    ],
    ids=[f"prompt-{b}" for b in ("stack", "average", "split", "sum")]
    + [f"reft-{b}" for b in ("average", "split", "sum", "fuse")]
    + ["prompt-fuse"],
)
def test_blocks_without_a_meaning_are_refused_before_anything_changes(setup, message):
    model = _model("bert")
    inputs = batch(2, 6, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        model.set_active_adapters(setup)
        model(**inputs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="no bottleneck layer"):
        model.add_adapter_fusion(setup.flatten())  # no fusion layer can be made for them either
    assert _run(model, "pa", inputs).shape[:2] == (2, 5 + 6)  # the model still runs


# ---- compiled ------------------------------------------------------------------------------------
def test_a_parallel_of_prefix_prompt_and_reft_trains_in_one_compiled_graph():
    """Prefixes and prompts of different lengths (padded, masked) and two ReFTs: one graph, any batch."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    kw = dict(compile="whole", compile_options={"backend": counting_backend})
    model = fxadapt.AdaptedModel(make("bert", head=True), **kw)
    model.add_adapter(
        "u", "prefix_tuning[prefix_length=3,bottleneck_size=8]|prompt_tuning[prompt_length=2]|loreft"
    )
    model.add_adapter(
        "v", "prefix_tuning[prefix_length=2,bottleneck_size=8]|prompt_tuning[prompt_length=4]|direft"
    )
    model.train_adapter(Parallel("u", "v"))
    for b in (2, 3):
        inputs = batch(b, 7, 2)
        out = model(**inputs, labels=torch.zeros(b, dtype=torch.long))
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.logits.shape == (2 * b, 2)
    assert len(graphs) == 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.adapters.parameters())
