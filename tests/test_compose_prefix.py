"""Prefix tuning in composition blocks: Stack concatenates prefixes, row blocks get their own, padding is masked.

Oracles: each adapter run alone on its rows (BatchSplit) or on the whole batch (Parallel), one flat
prefix holding the stacked prefixes (Stack), unions split into their parts; AdapterHub's own cases are
replayed in test_compose_adapterhub.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, main_output, make
from torch import nn

import fxadapt
from fxadapt import Average, BatchSplit, Fuse, Parallel, PrefixTuningConfig, Split, Stack, Sum
from fxadapt.adapter import slot
from fxadapt.errors import ConfigError
from passes.prefix import mask_scores, pad_mask, prefix_only_mask

A = PrefixTuningConfig(prefix_length=5, bottleneck_size=16)
B = PrefixTuningConfig(prefix_length=3, bottleneck_size=16, leave_out=[0])  # shorter, and not in layer 0
C = PrefixTuningConfig(prefix_length=2, bottleneck_size=8, flat=True)


def _randomize(model: fxadapt.AdaptedModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@functools.cache
def _model(arch: str, impl: str = "eager") -> fxadapt.AdaptedModel:
    """One model per architecture for this file's tests (a capture is the slow part), adapters a, b, c, d, l."""
    model = fxadapt.AdaptedModel(make(arch, attn_implementation=impl))
    configs = {"a": A, "b": B, "c": C, "d": A.replace(prefix_length=4), "l": "lora"}
    for i, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config)
        _randomize(model, name, i)
    return model.eval()


def _run(model: fxadapt.AdaptedModel, setup, inputs: dict) -> torch.Tensor:
    model.set_active_adapters(setup)
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else main_output(out)


def _rows(inputs: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in inputs.items()}


def _targets(model: fxadapt.AdaptedModel, inputs: dict) -> set:
    return {getattr(n.target, "__name__", "") for n in model.graph_for(**inputs).graph.nodes}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_row_blocks_and_channels_equal_each_adapter_alone(arch, impl):
    """Prefixes of 5 and 3 (3 not in layer 0) and a LoRA: padded prefix slots are masked."""
    model = _model(arch, impl)
    inputs = batch(4, 9, 3)  # the last row (in b's block) is padded
    out = _run(model, BatchSplit("l", "a", "b", batch_sizes=[1, 1, 2]), inputs)
    assert {"rows_prefix", "mask_scores" if impl == "eager" else "pad_mask"} <= _targets(model, inputs)
    for name, (start, stop) in zip("lab", [(0, 1), (1, 2), (2, 4)]):
        alone = _run(model, name, _rows(inputs, start, stop))
        torch.testing.assert_close(out[start:stop], alone, atol=2e-6, rtol=0)
    out = _run(model, Parallel("a", "b"), inputs)
    assert out.shape[0] == 8
    torch.testing.assert_close(out[:4], _run(model, "a", inputs), atol=2e-6, rtol=0)
    torch.testing.assert_close(out[4:], _run(model, "b", inputs), atol=2e-6, rtol=0)
    assert torch.equal(_run(model, Stack("a"), inputs), _run(model, "a", inputs))


def _flat_stack(model: fxadapt.AdaptedModel, names: list[str], name: str) -> None:
    """A flat prefix holding ``names``' prefixes stacked as AdapterHub stacks them: the last one first."""
    adapters = [model.adapters[n] for n in names]
    length = sum(a.config.prefix_length for a in adapters)
    model.add_adapter(name, PrefixTuningConfig(prefix_length=length, flat=True), overwrite_ok=True)
    for key, module in model.adapters[name].items():
        values = [a.layers[slot(key)].values() for a in reversed(adapters)]
        with torch.no_grad():
            module.control_trans.copy_(torch.cat(values).reshape(-1))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_stack_puts_the_last_adapters_prefix_first(arch):
    model = _model(arch)
    inputs = batch(2, 7, 2)
    _flat_stack(model, ["a", "c"], "ac")
    _flat_stack(model, ["a", "d"], "ad")
    stacked = _run(model, Stack("a", "c"), inputs)
    torch.testing.assert_close(stacked, _run(model, "ac", inputs), atol=2e-6, rtol=0)
    assert (stacked - _run(model, "a", inputs)).abs().max() > 1e-3
    # a row split inside a Stack: each row block is its own Stack, the shorter one padded and masked
    nested = _run(model, Stack("a", BatchSplit("c", "d", batch_sizes=[1, 1])), inputs)
    torch.testing.assert_close(nested[:1], _run(model, "ac", _rows(inputs, 0, 1)), atol=2e-6, rtol=0)
    torch.testing.assert_close(nested[1:], _run(model, "ad", _rows(inputs, 1, 2)), atol=2e-6, rtol=0)


def test_stack_with_a_left_out_layer_adds_only_the_other_prefix_there():
    model = _model("bert")
    inputs = batch(2, 7, 2)
    model.set_active_adapters(Stack("a", "b"))
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    model.set_active_adapters("a")
    with torch.no_grad():
        alone = model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], alone[1], atol=1e-6, rtol=0)  # b leaves layer 0 out
    assert (hidden[2] - alone[2]).abs().max() > 1e-3


class _CausalBlock(nn.Module):
    """SDPA with ``is_causal=True`` (or no mask at all) and no attention mask input."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds
        b, s, _ = x.shape
        q, k, v = (m(x).view(b, s, 2, 4).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.o(a.transpose(1, 2).reshape(b, s, 8))


class _Net(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_CausalBlock(causal)])

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](inputs_embeds)


@pytest.mark.parametrize("causal", [True, False], ids=["is_causal", "no_mask"])
def test_sdpa_without_a_mask_gets_one_that_hides_the_padding(causal):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8)
    model = fxadapt.AdaptedModel(_Net(causal).eval(), example_inputs={"inputs_embeds": x})
    for i, length in enumerate([3, 2]):
        model.add_adapter("ab"[i], PrefixTuningConfig(prefix_length=length, bottleneck_size=4))
        _randomize(model, "ab"[i], i)
    model.eval()
    out = _run(model, BatchSplit("a", "b", batch_sizes=[1, 2]), {"inputs_embeds": x})
    assert ("causal_prefix_mask" if causal else "prefix_only_mask") in _targets(model, {"inputs_embeds": x})
    torch.testing.assert_close(out[:1], _run(model, "a", {"inputs_embeds": x[:1]}), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1:], _run(model, "b", {"inputs_embeds": x[1:]}), atol=1e-6, rtol=0)


def test_mask_helpers_hide_exactly_the_padded_slots():
    valid = torch.tensor([[True, True, True], [False, True, True]])
    p = torch.zeros(2, 3, 4)
    float_mask = torch.zeros(1, 1, 1, 5)
    padded = pad_mask(float_mask, p, None, valid)
    assert padded.shape == (2, 1, 1, 8)
    assert (padded[0] == 0).all() and padded[1, 0, 0, 0] == torch.finfo(torch.float32).min
    assert (padded[1, 0, 0, 1:] == 0).all()
    bool_mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    assert pad_mask(bool_mask, p, None, valid)[:, 0, 0, :3].tolist() == valid.tolist()
    assert pad_mask(bool_mask, p, None, None).shape == (2, 1, 4, 8)  # no padding: all visible
    assert prefix_only_mask(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 5, 4), p, None) is None
    scores = torch.zeros(2, 2, 4, 8)
    masked = mask_scores(scores, valid)
    assert (masked[1, :, :, 0] == torch.finfo(torch.float32).min).all() and (masked[1, :, :, 1:] == 0).all()
    assert (masked[0] == 0).all()


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("config", ["mam", "unipelt"])
def test_unions_with_prefix_parts_compose(arch, config):
    """A Stack of two unions stacks their parts per method; a BatchSplit gives each row its union."""
    model = _model(arch)
    names = []
    for i, name in enumerate(["u", "v"]):
        model.add_adapter(name, config, overwrite_ok=True)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():  # smaller weights: stacked bottleneck adapters stay in range
            for p in model.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        names += _parts_as_adapters(model, name)
    model.eval()
    inputs = batch(3, 8, 2)
    out = _run(model, BatchSplit("u", "v", batch_sizes=[1, 2]), inputs)
    torch.testing.assert_close(out[:1], _run(model, "u", _rows(inputs, 0, 1)), atol=2e-6, rtol=0)
    torch.testing.assert_close(out[1:], _run(model, "v", _rows(inputs, 1, 3)), atol=2e-6, rtol=0)
    if arch == "llama" and config == "unipelt":  # its LoRA parts cannot chain on GQA's v_proj (32 -> 16)
        with pytest.raises(fxadapt.errors.FxAdaptError, match="v_proj.*cannot chain stacked LoRA"):
            _run(model, Stack("u", "v"), inputs)
        return
    stacked = _run(model, Stack("u", "v"), inputs)
    torch.testing.assert_close(stacked, _run(model, Stack(*names), inputs), atol=2e-6, rtol=0)
    assert (stacked - _run(model, "v", inputs)).abs().max() > 1e-3


def _parts_as_adapters(model: fxadapt.AdaptedModel, name: str) -> list[str]:
    union = model.adapters[name]
    names = []
    for i, (_, config, keys) in enumerate(union.parts()):
        part = f"{name}_part{i}"
        model.add_adapter(part, config, overwrite_ok=True)
        for key, module in model.adapters[part].items():
            module.load_state_dict(union.layers[slot(keys[key])].state_dict())
        names.append(part)
    return names


@pytest.mark.parametrize(
    "setup, message",
    [
        (Average("a", "b"), "prefix_tuning adapters cannot be composed with Average"),
        (Split("a", "b", splits=[4, 3]), "prefix_tuning adapters cannot be composed with Split"),
        (Sum("a", "b"), "prefix_tuning adapters cannot be composed with Sum"),
        (Fuse("a", "b"), "no fusion layer"),
    ],
    ids=["average", "split", "sum", "fuse"],
)
def test_blocks_without_a_meaning_for_prefixes_are_refused(setup, message):
    model = _model("bert")
    inputs = batch(2, 7, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        model.set_active_adapters(setup)
        model(**inputs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="no bottleneck layer"):
        model.add_adapter_fusion(Fuse("a", "b"))  # and no fusion layer can be made for them
    model.set_active_adapters("a")
    assert main_output(model(**inputs)).shape == (2, 7, 32)
