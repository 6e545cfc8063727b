"""Composition blocks on four architectures: equivalences, PEFT's sum, AdapterFusion, training, refusals.

Oracles: each adapter run alone (row blocks and channels), PEFT with several active LoRAs (Sum),
a fusion whose attention is one-hot (that adapter alone) or uniform (the mean written in plain torch),
AdapterHub's cases (tests/test_compose_adapterhub.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, compiled_graph_count, main_output, make
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import fxadapt
from fxadapt import (
    Average,
    BatchSplit,
    ConfigError,
    Fuse,
    LoRAConfig,
    Parallel,
    SeqBnConfig,
    Split,
    Stack,
    Sum,
)

ARCHS = ["bert", "gpt2", "llama", "bart"]
LORA = LoRAConfig(r=2, attn_matrices=["q", "v"], init_weights="bert")
BN = SeqBnConfig(reduction_factor=4)


def _model(arch: str, config, names=("a", "b", "c")) -> fxadapt.AdaptedModel:
    model = fxadapt.AdaptedModel(make(arch)).eval()
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        model.add_adapter(name, config)
    return model


def _inputs(arch: str, **kw) -> dict[str, torch.Tensor]:
    inputs = batch(**kw)
    if arch == "bart":  # given, so that the model does not shift labels into a new tensor
        inputs["decoder_input_ids"] = inputs["input_ids"]
    return inputs


def _run(model: fxadapt.AdaptedModel, setup, inputs) -> torch.Tensor:
    model.set_active_adapters(setup)
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("config", [LORA, BN], ids=["lora", "seq_bn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_row_blocks_and_channels_equal_each_adapter_alone(arch: str, config) -> None:
    model = _model(arch, config)
    inputs = _inputs(arch, b=3)
    alone = {n: _run(model, n, inputs) for n in ("a", "b", "c")}
    assert (alone["a"] - alone["b"]).abs().max() > 1e-4
    split = _run(model, BatchSplit("a", "b", batch_sizes=[1, 2]), inputs)
    torch.testing.assert_close(split[:1], alone["a"][:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(split[1:], alone["b"][1:], atol=1e-5, rtol=0)
    par = _run(model, Parallel("a", "b", "c"), inputs)
    assert par.shape[0] == 9
    for i, n in enumerate("abc"):
        torch.testing.assert_close(par[3 * i : 3 * (i + 1)], alone[n], atol=1e-5, rtol=0)
    torch.testing.assert_close(_run(model, Stack("a"), inputs), alone["a"], atol=0, rtol=0)
    # Parallel works for any batch size with the same graph
    small = _inputs(arch, b=2, s=5)
    torch.testing.assert_close(
        _run(model, Parallel("a", "b", "c"), small)[2:4], _run(model, "b", small), atol=1e-5, rtol=0
    )


def test_sum_is_peft_with_several_active_loras(tmp_path) -> None:
    base = make("bert").eval()
    peft_model = get_peft_model(
        copy.deepcopy(base),
        PeftLoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False),
        adapter_name="a",
    )
    peft_model.add_adapter(
        "b", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    peft_model.base_model.set_adapter(["a", "b"])
    inputs = batch()
    with torch.no_grad():
        want = peft_model(**inputs).last_hidden_state
    model = fxadapt.AdaptedModel(base)
    model.load_adapter(tmp_path / "a", load_as="a")
    model.load_adapter(tmp_path / "b", load_as="b")
    model.eval()
    got = _run(model, Sum("a", "b"), inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    stacked = _run(model, Stack("a", "b"), inputs)
    assert (stacked - want).abs().max() > 1e-4  # a Stack chains, it does not add
    with pytest.warns(UserWarning, match="Sum"):
        model.set_active_adapters(["a", "b"])


def test_lora_stack_refuses_a_non_square_site_clearly() -> None:
    model = _model("llama", LoRAConfig(attn_matrices=["q", "v"]))  # v_proj: 32 -> 16 (grouped-query)
    with pytest.raises(fxadapt.FxAdaptError, match=r"v_proj.*cannot chain"):
        model.set_active_adapters(Stack("a", "b"))
    assert model.active_adapters is None
    model.set_active_adapters(Sum("a", "b"))  # adding is fine


def test_average_of_loras_is_the_weighted_mean_of_updates() -> None:
    model = _model("bert", LORA)
    inputs = batch()
    avg = _run(model, Average("a", "b", weights=[1, 3]), inputs)
    for name in ("a", "b"):
        for _, module in model.adapters[name].items():
            module.lora_B.data *= {"a": 0.25, "b": 0.75}[name] / 2  # (1/N)·w_i folded into B
    torch.testing.assert_close(_run(model, Sum("a", "b"), inputs), avg, atol=1e-6, rtol=0)


def test_split_gives_each_segment_its_adapter() -> None:
    model = _model("bert", LORA)
    inputs = batch(s=9, pad=0)
    split = _run(model, Split("a", "b", splits=[4, 5]), inputs)
    # attention mixes positions, so compare against a model whose adapters act on those positions only:
    # the first layer's query projection output is exactly the per-segment one
    assert split.shape == (2, 9, 32)
    assert (split - _run(model, "a", inputs)).abs().max() > 1e-4
    model.set_active_adapters(Split("a", "b", splits=[4, 5]))
    with pytest.raises(ConfigError, match="splits add up to 9 but the sequence has 7"):
        model(**batch(s=7))


def _fusion_model(arch: str = "bert") -> fxadapt.AdaptedModel:
    model = _model(arch, BN)
    model.add_adapter_fusion(Fuse("a", "b", "c"))
    return model


def test_fusion_one_hot_equals_that_adapter_and_uniform_is_the_mean() -> None:
    model = _fusion_model()
    inputs = batch()
    with torch.no_grad():
        beta = torch.randn(32)
        for name in ("a", "b", "c"):  # up-projections: a constant beta for a, zero for b and c
            for _, m in model.adapters[name].items():
                m.adapter_up.weight.zero_()
                m.adapter_up.bias.copy_(beta if name == "a" else torch.zeros(32))
        for _, layer in model.fusions["a,b,c"].items():
            layer.query.weight.zero_()
            layer.query.bias.copy_(1000 * beta)  # the query is 1000·beta everywhere
            layer.key.weight.copy_(torch.eye(32))
            layer.key.bias.zero_()
            layer.value.weight.copy_(torch.eye(32))
    fused = _run(model, Fuse("a", "b", "c"), inputs)
    torch.testing.assert_close(fused, _run(model, "a", inputs), atol=1e-5, rtol=0)
    with torch.no_grad():
        for _, layer in model.fusions["a,b,c"].items():
            layer.query.bias.zero_()  # scores 0: uniform attention, output = mean of ups + residual
        uniform = _run(model, Fuse("a", "b", "c"), inputs)
    with torch.no_grad():
        for _, m in model.adapters["a"].items():
            m.adapter_up.bias.div_(3)
    torch.testing.assert_close(uniform, _run(model, "a", inputs), atol=1e-5, rtol=0)


def test_fusion_trains_only_fusion_parameters_and_round_trips(tmp_path) -> None:
    model = _fusion_model()
    model.train_adapter_fusion(Fuse("a", "b", "c"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fusions.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    target = torch.randn(2, 9, 32)
    for _ in range(4):
        loss = (main_output(model(**batch())) - target).pow(2).mean() + model.fusion_regularization_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable and losses[-1] < losses[0]
    # AdapterHub's regularization: 0.01·||I - W_v||² summed over layers
    hand = sum(
        0.01 * (torch.eye(32) - m.value.weight).pow(2).sum() for _, m in model.fusions["a,b,c"].items()
    )
    torch.testing.assert_close(model.fusion_regularization_loss(), hand)
    model.save_adapter_fusion(tmp_path, "a,b,c")
    again = _model("bert", BN)
    for name in "abc":
        again.adapters[name].load_state_dict(model.adapters[name].state_dict())
    again.load_adapter_fusion(tmp_path, set_active=True)
    for (k, m), (k2, m2) in zip(model.fusions["a,b,c"].items(), again.fusions["a,b,c"].items()):
        assert k == k2 and all(
            torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values())
        )
    model.eval()
    assert torch.equal(_run(again, Fuse("a", "b", "c"), batch()), _run(model, Fuse("a", "b", "c"), batch()))


@pytest.mark.parametrize(
    "arch, setup",
    [
        ("bert", Stack("a", "b")),
        ("bert", Fuse("a", "b", "c")),
        ("bert", BatchSplit("a", "b", batch_sizes=[1, 1])),
        ("bert", Parallel("a", "b")),
        ("llama", Stack("a", "b")),
        ("llama", BatchSplit("a", "b", batch_sizes=[1, 1])),
        ("llama", Parallel("a", "b")),
    ],
)
def test_training_through_a_block_lowers_the_loss_and_leaves_the_base_alone(arch: str, setup) -> None:
    model = _model(arch, BN)
    if isinstance(setup, Fuse):
        model.add_adapter_fusion(setup)
        model.train_adapter_fusion(setup, unfreeze_adapters=True)
    else:
        model.train_adapter(setup)
    base = {k: v.clone() for k, v in model.base.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    target = torch.randn_like(main_output(model(**inputs)))
    losses = []
    for _ in range(5):
        loss = (main_output(model(**inputs)) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base.items())


@pytest.mark.parametrize(
    "setup", [Stack("a", "b"), Fuse("a", "b"), BatchSplit("a", "b", batch_sizes=[1, 1]), Parallel("a", "b")]
)
def test_a_compiled_training_step_through_a_block_is_one_graph(setup) -> None:
    assert compiled_graph_count("bert", BN, training=True, setup=setup) == 1


def test_compiled_block_does_not_recompile_for_new_lengths() -> None:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fxadapt.AdaptedModel(make("bert"), compile=True, compile_options={"backend": backend}).eval()
    for name in "ab":
        model.add_adapter(name, BN)
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    with torch.no_grad():
        for s in (5, 9, 12):
            model(**batch(b=3, s=s))
    assert len(graphs) == 1


def test_bad_setups_are_refused_before_anything_changes() -> None:
    model = _model("bert", LORA)
    model.add_adapter("bn", BN)
    model.add_adapter("bn2", BN)
    model.set_active_adapters("a")
    refused = [
        (Stack("a", Fuse("b", Stack(Fuse("a", "b"), "c"))), "too deep|cannot contain"),
        (Fuse(Fuse("a", "b"), "c"), "Fuse cannot contain Fuse"),
        (Split("a", Fuse("b", "c"), splits=[4, 5]), "Split cannot contain Fuse"),
        (Parallel("a", Fuse("b", "c")), "Parallel cannot contain Fuse"),
        (Stack("a", "nope"), r"no adapter named \['nope'\]"),
        (Stack("a", "a"), "appears twice"),
        (Fuse("bn", "a"), r"\['a'\] have no adapter there; AdapterFusion fuses bottleneck adapters"),
        (Fuse("bn", "bn2"), r"no fusion layer 'bn,bn2'.*add_adapter_fusion"),
        (5, "must be a name"),
    ]
    for setup, message in refused:
        with pytest.raises(ConfigError, match=message):
            model.set_active_adapters(setup)
        assert model.active_adapters == Stack("a")
    with pytest.raises(ConfigError, match="batch_sizes"):
        BatchSplit("a", "b", batch_sizes=[1, 2, 3])
    with pytest.raises(ConfigError, match="ints >= 0"):
        Split("a", "b", splits=[1, -1])
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    with pytest.raises(ConfigError, match="batch_sizes add up to 3 but the batch has 2 rows"):
        model(**batch())


def test_merging_and_blocks() -> None:
    model = _model("bert", LORA)
    inputs = batch()
    model.set_active_adapters(Sum("a", "b"))
    summed = _run(model, Sum("a", "b"), inputs)
    model.merge_adapter("a")  # a Sum of updates: merging one keeps the outputs
    torch.testing.assert_close(_run(model, Sum("a", "b"), inputs), summed, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="merged into the base weights"):
        model.set_active_adapters(Parallel("a", "b"))
    model.reset_adapter()
    model.set_active_adapters(Parallel("a", "b"))
    with pytest.raises(ConfigError, match="part of the active setup"):
        model.merge_adapter("a")
    assert model.merged_adapters == ()


def test_support_matrix_in_the_docs_is_current() -> None:
    from pathlib import Path

    from fxadapt.compose.matrix import render_markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "composition.md").read_text()
    block = text.split("<!-- support-matrix -->")[1].split("<!-- /support-matrix -->")[0].strip()
    assert block == render_markdown(), "run: python -m fxadapt.compose.matrix docs/composition.md"
