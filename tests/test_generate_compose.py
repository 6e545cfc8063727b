"""generate() with composition: ``Parallel`` (N·B sequences), per-row ``adapter_names=``, Stack/Fuse/Average.

Oracles: each block of a ``Parallel`` generation is that adapter generating alone (AdapterHub replicates
the prompts channel-major, so block ``i`` is child ``i``); per-row routing is PEFT's ``generate(...,
adapter_names=...)`` with the same LoRA weights, and each row is that row generated with its adapter
active; Stack/Fuse/Average decode steps equal fxadapt's full forward on the same tokens (teacher forcing).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_generate import (
    _generated_captures,
    _teacher_forced_error,
    encoder_prompts,
    lm,
    prompts,
)

import fxadapt
from fxadapt import Average, BatchSplit, ConfigError, Fuse, Parallel, Split, Stack

KW = dict(max_new_tokens=6, do_sample=False)


def _perturb(model: fxadapt.AdaptedModel, name: str, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _two(arch: str, first: str, second: str) -> fxadapt.AdaptedModel:
    model = fxadapt.AdaptedModel(lm(arch))
    model.add_adapter("a", first)
    model.add_adapter("b", second)
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    return model.eval()


@pytest.mark.parametrize(
    "arch, first, second",
    [("llama", "lora", "prefix_tuning[prefix_length=3]"), ("bart", "lora", "seq_bn")],
)
def test_parallel_generates_each_block_as_its_adapter_alone(arch, first, second):
    """B prompts give 2·B sequences, channel-major: rows [0, B) are "a"'s, rows [B, 2B) are "b"'s."""
    model = _two(arch, first, second)
    inputs = encoder_prompts() if arch == "bart" else prompts()
    alone = {}
    for name in ("a", "b"):
        model.set_active_adapters(name)
        alone[name] = model.generate(**inputs, **KW)
    assert not torch.equal(alone["a"], alone["b"])
    model.set_active_adapters(Parallel("a", "b"))
    out = model.generate(**inputs, **KW, return_dict_in_generate=True, output_logits=True)
    b = inputs["input_ids"].shape[0]
    assert out.sequences.shape[0] == 2 * b and out.logits[0].shape[0] == 2 * b
    assert torch.equal(out.sequences[:b], alone["a"])
    assert torch.equal(out.sequences[b:], alone["b"])


def _peft_pair(tmp_path):
    base = lm("llama")
    targets = ["q_proj", "v_proj", "down_proj"]
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
    return base, peft_model, model.eval()


def test_adapter_names_equal_peft_mixed_batch_generate(tmp_path):
    base, peft_model, model = _peft_pair(tmp_path)
    inputs = prompts(4, 7)
    names = ["b", "a", "__base__", "a"]
    with torch.no_grad():
        expected = peft_model.generate(**inputs, **KW, adapter_names=names)
    got = model.generate(**inputs, **KW, adapter_names=[None if n == "__base__" else n for n in names])
    assert torch.equal(got, expected)
    with torch.no_grad():
        assert torch.equal(got[2], base.generate(**inputs, **KW)[2])  # None: the base model's row
    for name in ("a", "b"):  # every row is that row generated with its adapter active
        model.set_active_adapters(name)
        alone = model.generate(**inputs, **KW)
        rows = [i for i, n in enumerate(names) if n == name]
        assert torch.equal(got[rows], alone[rows])
    assert not torch.equal(got[0], got[3])  # rows with different adapters differ: the routing matters


@functools.cache
def _composed() -> fxadapt.AdaptedModel:
    """Bottlenecks a, b (with a fusion over them) and LoRAs c, d on one model: its captures serve each setup."""
    model = fxadapt.AdaptedModel(lm("llama"))
    for i, (name, config) in enumerate([("a", "seq_bn"), ("b", "seq_bn"), ("c", "lora"), ("d", "lora")]):
        model.add_adapter(name, config)
        _perturb(model, name, i + 1)
    model.add_adapter_fusion(Fuse("a", "b"))
    _perturb_fusion(model)
    return model.eval()


def _perturb_fusion(model: fxadapt.AdaptedModel) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.fusions.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    "setup",
    [
        Stack("a", "b"),
        Fuse("a", "b"),
        Average("c", "d", weights=[0.3, 0.7]),
        Stack("c", Fuse("a", "b")),
        BatchSplit("c", "d", batch_sizes=[1, 2]),
    ],
    ids=["stack", "fuse", "average", "stack-lora-fuse", "batchsplit"],
)
def test_composed_decode_steps_equal_the_full_forward(setup):
    model = _composed()
    model.set_active_adapters(setup)
    assert _teacher_forced_error(model, prompts()) < 1e-5


def test_bad_adapter_names_are_refused_before_anything_runs():
    model = _two("llama", "lora", "ia3")
    before = list(_generated_captures(model))
    cases = [
        (["a", "b"], "2 names but the batch has 3 rows"),
        (["a", "zz", None], r"no adapter named \['zz'\]"),
        ("a", "one adapter name"),
        ([3, "a", None], "each entry must be an adapter name or None"),
    ]
    for names, message in cases:
        with pytest.raises(ConfigError, match=message):
            model.generate(**prompts(), **KW, adapter_names=names)
    with pytest.raises(ConfigError, match="2 names but the batch has 3 rows"):  # counted per prompt
        model.generate(
            **prompts(), max_new_tokens=4, do_sample=True, num_return_sequences=2, adapter_names=["a", "b"]
        )
    model.train()
    with pytest.raises(ConfigError, match="inference only"):
        model.generate(**prompts(), **KW, adapter_names=["a", "b", None])
    model.eval()
    model.merge_adapter("a")
    with pytest.raises(ConfigError, match="merged"):
        model.generate(**prompts(), **KW, adapter_names=["a", "b", None])
    assert _generated_captures(model) == before  # nothing was captured or run


def test_split_is_refused_before_anything_runs():
    model = _composed()
    model.set_active_adapters(Split("a", "b", splits=[3, 4]))
    before = list(_generated_captures(model))
    with pytest.raises(ConfigError, match="decode step is one token"):
        model.generate(**prompts(), **KW)
    assert _generated_captures(model) == before


def test_compiled_routed_and_parallel_decoding_compile_once():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def decode_graphs() -> int:
        return sum(
            any("cache_position" in n.name for n in g.graph.nodes if n.op == "placeholder") for g in graphs
        )

    torch._dynamo.reset()
    model = fxadapt.AdaptedModel(lm("llama"), compile=True, compile_options={"backend": counting_backend})
    model.add_adapter("a", "lora")
    model.add_adapter("b", "lora")
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    model.eval()
    for names, (b, s, n) in [(["a", "b", None], (3, 7, 3)), ([None, "b", "a", "a"], (4, 5, 9))]:
        assert model.generate(**prompts(b, s), max_new_tokens=n, adapter_names=names).shape[0] == b
    assert decode_graphs() == 1  # one routed decode graph for every assignment, length and step
    model.set_active_adapters(Parallel("a", "b"))
    for b, s, n in [(2, 6, 3), (3, 9, 8)]:
        assert model.generate(**prompts(b, s), max_new_tokens=n).shape[0] == 2 * b
    assert decode_graphs() == 2  # and one for Parallel
